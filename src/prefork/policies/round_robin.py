"""SCHED_RR: the primary accepts and hands each connection to the next worker in turn.

The hot path of prefork. Per wake-up the accept queue is drained with the raw `_accept` (no socket
objects); each connection goes at once, one record, down the next worker's hand-off link
(handoff.py, read by the worker's serving loop itself) and the primary closes its copy. Nothing
comes back per connection: the primary keeps a reference to each worker's end of its link, so what
a worker has not read stays there and is reclaimed if the worker dies, drains or closes its
listener, then goes to another worker, never lost. How many wait in a link is the worker's window:
at `WINDOW` a worker gets no more, so a slow worker cannot pile them up while others idle. With no
worker able to take more, the primary stops accepting and the kernel's backlog holds the rest.
"""

from __future__ import annotations

import array
import collections
import errno
import os
import socket
import sys
import time
from typing import Any

from .. import handoff
from ..binding import ACCEPT_RETRY_S, OUT_OF_RESOURCES, bind_socket
from .base import Handle, close_fds, wire_name

WINDOW = 64
_ONE = handoff.RECORD  # one connection's record (handoff.py)
_SOL, _RIGHTS, _DONTWAIT, _ORDER = socket.SOL_SOCKET, socket.SCM_RIGHTS, socket.MSG_DONTWAIT, sys.byteorder
ACCEPTS_PER_WAKE = 512
# A wake-up that took several connections means they arrive faster than they are taken one by one:
# the loop then sleeps COALESCE_PER per connection taken (at most COALESCE_MAX) before it looks
# again, so the next wake-up takes what gathered at once, with one record per eager worker. Each
# wake-up costs the primary a context switch and a few system calls; at one connection each, that
# was most of its 23-25 us per connection (12-13 now). `Connection: close`, 2 workers, wrk -t1,
# 3 alternated runs: -c64 10.6-11.6k req/s -> 14.2-15.0k; -c8 8.8-9.5k -> 8.7-9.4k (p50 +0.09 ms).
# One connection per wake-up (low rates) never sleeps.
COALESCE_PER = 0.00004
COALESCE_MAX = 0.001
RECHECK_S = 0.005  # every window full: how often to look again (no acknowledgement will wake us)
handed_out = [0]  # connections handed to workers by rr and least_conn, ever (metrics.py)


class RoundRobinHandle(Handle):
    policy = "rr"
    counts = False  # whether `handed` is called (load-aware subclasses)
    measure_each_wake = False  # look at every link at each wake-up, not only when credits run out
    recheck_s = RECHECK_S

    def __init__(self, servers: Any, hid: int, family: int, addr: Any, backlog: int) -> None:
        super().__init__(servers, hid, family, addr, backlog)
        self.sock = bind_socket(family, addr, backlog)
        self.sockname = wire_name(self.sock)
        self._accept = self.sock._accept  # type: ignore[attr-defined]
        self.order: list[Any] = []  # workers that may get connections, in turn
        self.next = 0
        self.links: dict[int, socket.socket] = {}  # worker id -> the primary's end of its link
        self.ends: dict[int, socket.socket] = {}  # worker id -> the primary's copy of the worker's end
        self.room: dict[int, int] = {}  # worker id -> connections it may get before its link is looked at
        self.blocked: set[int] = set()  # workers whose link refused a record in this wake-up
        self.eager: set[int] = set()  # workers whose server takes all waiting at once: batched
        self.pending: collections.deque[int] = collections.deque()  # waiting for a worker
        self.reading = False
        self.rechecking = False
        self.resting = False  # out of descriptors: not watching the listener until ACCEPT_RETRY_S

    # -- membership ------------------------------------------------------------------------------

    def add(self, worker: Any, link: list[int]) -> tuple[dict[str, Any], list[int]]:
        if len(link) != 2:
            close_fds(link)
            raise OSError(errno.EPROTO, "a round-robin listener needs both ends of its hand-off link")
        self._drop_link(worker)
        ours, theirs = (socket.socket(fileno=fd) for fd in link)
        ours.setblocking(False)
        theirs.setblocking(False)
        self.links[worker.id], self.ends[worker.id] = ours, theirs
        self.loop.add_reader(ours.fileno(), lambda: self._on_link(worker))
        self.workers[worker.id] = worker
        if worker not in self.order:
            self.order.append(worker)
        self.loop.call_soon(self._deliver_pending)
        return {"mode": "q"}, []

    def pause(self, worker: Any) -> None:
        """It drains: nothing new, and what waits unread in its link goes to the others now (a
        draining worker that hangs would hold it until it is killed). Whatever it had read already
        is its own; a record is read by one side or the other, never both."""
        self._leave_order(worker)
        if self.order and not self.stopped:  # stopping: nobody else would take them
            self._take_back(worker)
            self.loop.call_soon(self._deliver_pending)

    def remove(self, worker: Any) -> None:
        self._leave_order(worker)
        self._read_link(worker)
        self._take_back(worker)
        self._drop_link(worker)
        self.workers.pop(worker.id, None)
        self.room.pop(worker.id, None)
        self.blocked.discard(worker.id)
        self.eager.discard(worker.id)
        self._deliver_pending()

    def _leave_order(self, worker: Any) -> None:
        if worker in self.order:
            self.order.remove(worker)
            self.next = self.next % len(self.order) if self.order else 0

    def _take_back(self, worker: Any) -> None:
        """What waits unread in its link goes to the others, first in line."""
        end = self.ends.get(worker.id)
        if end is not None:
            self.pending.extendleft(reversed(handoff.reclaim(end)))

    def remeasure(self) -> None:
        """Forget every worker's credits: its link is looked at again when next picked."""
        self.room.clear()

    def handed(self, worker: Any) -> None:
        """Hook for load-aware subclasses: one more connection went to `worker`."""

    # -- the hand-off links ----------------------------------------------------------------------

    def _on_link(self, worker: Any) -> None:
        if self._read_link(worker):
            self.remove(worker)
            self.servers.close_if_unused(self)

    def _read_link(self, worker: Any) -> bool:
        """Apply what the worker sent (connections closed, EAGER, connections a closing listener
        gives back); True if its end is gone."""
        link = self.links.get(worker.id)
        if link is None:
            return False
        try:
            records, returned, ended = handoff.recv_records(link)
        except OSError:
            records, returned, ended = [], [], True
        for kind, count in records:
            if kind == handoff.FINISHED:
                self.finished(worker, count)
            elif kind == handoff.EAGER:
                self.eager.add(worker.id)
        if returned:  # its listener closed holding these: first in line for the others
            self.pause(worker)
            self.pending.extendleft(reversed(returned))
            self.loop.call_soon(self._deliver_pending)
        return ended

    def _drop_link(self, worker: Any) -> None:
        link = self.links.pop(worker.id, None)
        if link is not None:
            self.loop.remove_reader(link.fileno())
            link.close()
        end = self.ends.pop(worker.id, None)
        if end is not None:
            self.pending.extend(handoff.reclaim(end))  # a worker listening anew: its old link's
            end.close()

    # -- choosing a worker -----------------------------------------------------------------------

    def has_room(self, worker: Any) -> int:
        """How many more it may get: credits, counted down per connection given; when they run
        out, its window less what still waits in its link (one ioctl per WINDOW connections at
        most, not one per wake-up). What waits never exceeds WINDOW: a worker gets at most the
        room it had when last looked at."""
        wid = worker.id
        room = self.room.get(wid)
        if (room is None or room <= 0) and wid not in self.blocked:
            try:
                room = WINDOW - handoff.waiting(self.ends[wid])
            except (OSError, KeyError):
                room = 0
            self.room[wid] = room
        return room  # type: ignore[return-value]

    def pick(self) -> Any:
        """The next worker in turn that has room in its window, or None. (Once per connection:
        written for speed.)"""
        order, room = self.order, self.room
        n = len(order)
        idx = self.next
        for _ in range(n):
            if idx >= n:
                idx = 0
            worker = order[idx]
            idx += 1
            left = room.get(worker.id)
            if left is None or left <= 0:
                left = self.has_room(worker)
            if left > 0:
                self.next = idx
                return worker
        return None

    # -- accepting and handing over --------------------------------------------------------------

    def _give(self, worker: Any, fd: int) -> bool:
        """Hand `fd` to `worker`; False when its link cannot take it now. The caller still owns
        its copy of `fd` either way (and closes it once handed: see `_close`)."""
        wid = worker.id
        try:
            self.links[wid].sendmsg(_ONE, [(_SOL, _RIGHTS, fd.to_bytes(4, _ORDER))], _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            self.room[wid] = 0
            self.blocked.add(wid)  # until the next wake-up: its socket buffer is full
            return False
        except (OSError, KeyError):
            self.remove(worker)  # its link is gone: what it had goes to the others
            return False
        self.room[wid] -= 1
        handed_out[0] += 1
        if self.counts:
            self.handed(worker)
        return True

    def _give_many(self, worker: Any, fds: list[int]) -> list[int]:
        """Hand `fds` to an eager worker in one record (per MAX_FDS); returns those sent, the
        caller closes them. What its link did not take goes back in line for any worker."""
        wid, sent = worker.id, 0
        try:
            link = self.links[wid]
            while sent < len(fds):
                part = fds[sent:sent + handoff.MAX_FDS]
                link.sendmsg([b"c" * len(part)], [(_SOL, _RIGHTS, array.array("i", part))], _DONTWAIT)
                sent += len(part)
        except (BlockingIOError, InterruptedError):
            self.room[wid] = 0
            self.blocked.add(wid)
        except (OSError, KeyError):
            self.pending.extendleft(reversed(fds[sent:]))
            self.remove(worker)
            return fds[:sent]
        if sent < len(fds):
            self.pending.extendleft(reversed(fds[sent:]))
            self.loop.call_soon(self._deliver_pending)
        handed_out[0] += sent
        if self.counts:
            for _ in range(sent):
                self.handed(worker)
        return fds[:sent]

    def stop_accepting(self) -> None:
        """The cluster stops: no new handshake completes (base.py refuse_new), take what the
        backlog holds, then stop listening (new connects are refused, not reset); what was taken
        is handed over and served by the draining workers."""
        if self.closed or self.sock.fileno() < 0:
            return
        self.stopped = True
        self._pause_accepting()
        self.refuse_new()
        while True:
            try:
                fd, _addr = self._accept()
            except OSError:
                break
            self.pending.append(fd)
        self.sock.close()
        self._unblock()
        pending = self.pending
        for _ in range(len(pending)):  # past the windows: nobody else will take them
            worker = self.pick() or (self.order[0] if self.order else None)
            if worker is None:
                break
            fd = pending.popleft()
            if not self._give(worker, fd):
                pending.appendleft(fd)
                break
            os.close(fd)

    def _resume(self) -> None:
        if (not self.reading and not self.resting and not self.closed and self.order
                and self.sock.fileno() >= 0):
            self.reading = True
            self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _pause_accepting(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sock.fileno())

    def _on_readable(self) -> None:
        accept, pick, give, eager, room = self._accept, self.pick, self._give, self.eager, self.room
        if self.blocked:  # a new wake-up: their links may take records again
            self._unblock()
        if self.measure_each_wake:
            self.remeasure()
        handed: list[int] = []
        batches: dict[Any, list[int]] = {}
        taken = 0
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                fd, _addr = accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    self._rest()
                    break
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that one connection failed, not the listener
                break  # anything else: try again on the next wake-up
            taken += 1
            worker = pick()
            if worker is not None and worker.id in eager:  # sent together, after the loop
                room[worker.id] -= 1
                batch = batches.get(worker)
                if batch is None:
                    batches[worker] = [fd]
                else:
                    batch.append(fd)
                continue
            while worker is not None and not give(worker, fd):
                worker = pick()  # that one's link was full or gone
            if worker is None:
                self.pending.append(fd)  # every window is full: the backlog holds the rest
                self._full()
                break
            handed.append(fd)
        for worker, fds in batches.items():
            handed += self._give_many(worker, fds)
        _close(handed)
        if taken > 1 and self.reading:  # busy: let the next ones gather, longer the more came
            time.sleep(min(COALESCE_MAX, taken * COALESCE_PER))

    def _rest(self) -> None:
        """Out of descriptors: the connection stays queued and the socket readable, so watching
        it would spin. Stop for a while, then look again."""
        self._pause_accepting()
        if not self.resting:
            self.resting = True
            self.loop.call_later(ACCEPT_RETRY_S, self._wake_up)

    def _wake_up(self) -> None:
        self.resting = False
        self._resume()

    def _unblock(self) -> None:
        for wid in self.blocked:
            self.room.pop(wid, None)
        self.blocked.clear()

    def _full(self) -> None:
        self._pause_accepting()
        if not self.rechecking and not self.closed:
            self.rechecking = True
            self.loop.call_later(self.recheck_s, self._recheck)

    def _recheck(self) -> None:
        self.rechecking = False
        self._deliver_pending()

    def _deliver_pending(self) -> None:
        pending = self.pending
        self._unblock()
        while pending:
            worker = self.pick()
            if worker is None:
                if self.order:
                    self._full()
                return
            fd = pending.popleft()
            if self._give(worker, fd):
                os.close(fd)
            else:
                pending.appendleft(fd)
        self._resume()

    def close(self) -> None:
        if self.closed:
            return
        self._pause_accepting()
        super().close()
        for wid in list(self.links):
            self._drop_link(self.workers.get(wid) or _Gone(wid))
        close_fds(list(self.pending))
        self.pending.clear()
        self.sock.close()


def _close(fds: list[int]) -> None:
    """Close the copies of what was handed over in one wake-up: accepted one after another, they
    are mostly consecutive numbers, so one close_range does it (only when the range is exactly
    these descriptors, all ours)."""
    if len(fds) > 2:
        low, high = min(fds), max(fds)
        if high - low + 1 == len(fds):
            os.closerange(low, high + 1)
            return
    for fd in fds:
        os.close(fd)


class _Gone:
    """Stands for a worker the handle no longer knows, to drop its link by id."""

    def __init__(self, wid: int) -> None:
        self.id = wid
