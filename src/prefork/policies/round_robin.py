"""SCHED_RR: the primary accepts and hands each connection to the next worker in turn.

The hot path of prefork. Per wake-up the accept queue is drained with the raw `_accept` (no socket
objects), descriptors are batched per worker into one sendmsg on that worker's hand-off link
(handoff.py, read by the worker's serving loop itself), and each worker may hold at most
`WINDOW` connections it has not yet taken, so a slow worker cannot pile them up while others idle.
The primary keeps every handed-over descriptor until the worker says it took it: if that worker
dies, drains or closes its listener first, the connection goes to another worker, never lost.
With no worker able to take more, the primary stops accepting and the kernel's backlog holds them.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
from typing import Any

from .. import handoff
from ..handles import bind_socket
from .base import Handle, close_fds, wire_name

WINDOW = 64
ACCEPTS_PER_WAKE = 512


class RoundRobinHandle(Handle):
    policy = "rr"

    def __init__(self, servers: Any, hid: int, family: int, addr: Any, backlog: int) -> None:
        super().__init__(servers, hid, family, addr, backlog)
        self.sock = bind_socket(family, addr, backlog)
        self.sockname = wire_name(self.sock)
        self._accept = self.sock._accept  # type: ignore[attr-defined]
        self.order: list[Any] = []  # workers that may get connections, in turn
        self.next = 0
        self.inflight: dict[int, collections.deque[int]] = {}
        self.pending: collections.deque[int] = collections.deque()  # taken back, waiting for a worker
        self.reading = False
        self.links: dict[int, socket.socket] = {}  # worker id -> the primary's end of its link

    # -- membership ------------------------------------------------------------------------------

    def add(self, worker: Any, link: list[int]) -> tuple[dict[str, Any], list[int]]:
        if not link:
            raise OSError(errno.EPROTO, "a round-robin listener needs its hand-off link")
        close_fds(link[1:])
        self._drop_link(worker)
        sock = socket.socket(fileno=link[0])
        sock.setblocking(False)
        self.links[worker.id] = sock
        self.loop.add_reader(sock.fileno(), lambda: self._on_link(worker))
        self.workers[worker.id] = worker
        if worker not in self.order:
            self.order.append(worker)
        self.inflight.setdefault(worker.id, collections.deque())
        self.loop.call_soon(self._deliver_pending)
        return {"mode": "q"}, []

    def pause(self, worker: Any) -> None:
        if worker in self.order:
            self.order.remove(worker)
            self.next = self.next % len(self.order) if self.order else 0

    def remove(self, worker: Any) -> None:
        self.pause(worker)
        self._read_link(worker)  # what it took, reported just before it closed, counts first
        self._drop_link(worker)
        self.workers.pop(worker.id, None)
        taken_back = self.inflight.pop(worker.id, None)
        if taken_back:
            self.pending.extendleft(reversed(taken_back))
        self._deliver_pending()

    def accepted(self, worker: Any, count: int) -> None:
        queue = self.inflight.get(worker.id)
        if not queue:
            return
        for _ in range(min(count, len(queue))):
            os.close(queue.popleft())
        self._took(worker, count)
        if self.pending:
            self._deliver_pending()
        elif not self.reading:
            self._resume()

    def _took(self, worker: Any, count: int) -> None:
        """Hook for load-aware subclasses."""

    # -- the hand-off links ----------------------------------------------------------------------

    def _on_link(self, worker: Any) -> None:
        if self._read_link(worker):  # its listener closed, or it went: the rest goes to the others
            self.remove(worker)
            self.servers.close_if_unused(self)

    def _read_link(self, worker: Any) -> bool:
        """Apply the worker's reports (connections taken, closed); True once its end has closed."""
        link = self.links.get(worker.id)
        if link is None:
            return False
        try:
            records, ended = handoff.recv_records(link)
        except OSError:
            records, ended = [], True
        for kind, count in records:
            if kind == handoff.TOOK:
                self.accepted(worker, count)
            elif kind == handoff.FINISHED:
                self.finished(worker, count)
        return ended

    def _drop_link(self, worker: Any) -> None:
        link = self.links.pop(worker.id, None)
        if link is not None:
            self.loop.remove_reader(link.fileno())
            link.close()

    # -- choosing a worker -----------------------------------------------------------------------

    def pick(self) -> Any:
        """The next worker in turn that has room in its window, or None."""
        order = self.order
        n = len(order)
        inflight = self.inflight
        for i in range(n):
            worker = order[(self.next + i) % n]
            if len(inflight[worker.id]) < WINDOW:
                self.next = (self.next + i + 1) % n
                return worker
        return None

    # -- accepting and handing over --------------------------------------------------------------

    def stop_accepting(self) -> None:
        """The cluster stops: take what the backlog holds, then stop listening (new connects are
        refused, not reset); what was taken is handed over and served by the draining workers."""
        if self.closed or self.sock.fileno() < 0:
            return
        self.stopped = True
        self._pause_accepting()
        batches: dict[Any, list[int]] = {}
        while True:
            try:
                fd, _addr = self._accept()
            except OSError:
                break
            worker = self.pick() or (self.order[0] if self.order else None)
            if worker is None:
                self.pending.append(fd)
                continue
            batches.setdefault(worker, []).append(fd)
            self.inflight[worker.id].append(fd)
        for worker, fds in batches.items():
            self._send(worker, fds)
        self.sock.close()

    def _resume(self) -> None:
        if not self.reading and not self.closed and self.order and self.sock.fileno() >= 0:
            self.reading = True
            self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _pause_accepting(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sock.fileno())

    def _on_readable(self) -> None:
        batches: dict[Any, list[int]] = {}
        accept, pick = self._accept, self.pick
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                fd, _addr = accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ECONNABORTED, EMFILE...: try again on the next wake-up
                break
            worker = pick()
            if worker is None:  # every window is full: hold it, and let the backlog hold the rest
                self.pending.append(fd)
                self._pause_accepting()
                break
            batch = batches.get(worker)
            if batch is None:
                batches[worker] = [fd]
            else:
                batch.append(fd)
            self.inflight[worker.id].append(fd)
        for worker, fds in batches.items():
            self._send(worker, fds)

    def _send(self, worker: Any, fds: list[int]) -> None:
        link = self.links.get(worker.id)
        for start in range(0, len(fds), handoff.MAX_FDS):
            try:
                handoff.send_fds(link, fds[start:start + handoff.MAX_FDS])  # type: ignore[arg-type]
            except (BlockingIOError, InterruptedError):  # its link is full: take back what is left
                unsent = fds[start:]
                queue = self.inflight[worker.id]
                for _ in unsent:
                    queue.pop()
                self.pending.extendleft(reversed(unsent))
                return
            except (OSError, AttributeError):
                self.remove(worker)  # its link is gone: the connections go to another worker
                return

    def _deliver_pending(self) -> None:
        batches: dict[Any, list[int]] = {}
        pending = self.pending
        while pending:
            worker = self.pick()
            if worker is None:
                break
            fd = pending.popleft()
            batches.setdefault(worker, []).append(fd)
            self.inflight[worker.id].append(fd)
        for worker, fds in batches.items():
            self._send(worker, fds)
        if not pending:
            self._resume()

    def close(self) -> None:
        if self.closed:
            return
        self._pause_accepting()
        super().close()
        for queue in self.inflight.values():
            for fd in queue:
                os.close(fd)
        for fd in self.pending:
            os.close(fd)
        for link in self.links.values():
            self.loop.remove_reader(link.fileno())
            link.close()
        self.links.clear()
        self.inflight.clear()
        self.pending.clear()
        self.sock.close()
