"""SCHED_RR: the primary accepts and hands each connection to the next worker in turn.

The hot path of prefork. Per wake-up the accept queue is drained with the raw `_accept` (no socket
objects), descriptors are batched per worker into one sendmsg, and each worker may hold at most
`WINDOW` connections it has not yet taken, so a slow worker cannot pile them up while others idle.
The primary keeps every handed-over descriptor until the worker says it took it: if that worker
dies, drains or closes its listener first, the connection goes to another worker, never lost.
With no worker able to take more, the primary stops accepting and the kernel's backlog holds them.
"""

from __future__ import annotations

import collections
import os
from typing import Any

from ..channel import MAX_FDS
from ..handles import bind_socket
from .base import Handle, wire_name

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

    # -- membership ------------------------------------------------------------------------------

    def add(self, worker: Any) -> tuple[dict[str, Any], list[int]]:
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
        channel = worker._channel
        for start in range(0, len(fds), MAX_FDS):
            chunk = fds[start:start + MAX_FDS]
            if not channel.send_internal(["c", self.id], chunk):
                self.remove(worker)  # its channel is gone: the connections go to another worker
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
        self.inflight.clear()
        self.pending.clear()
        self.sock.close()
