"""SCHED_LEAST_CONN: like round robin, but each connection goes to the worker least busy.

Workers report, cheaply and in batches, how many of their connections have closed; the primary
counts a worker's open connections as those it handed over less those reported closed. It also
looks, at each wake-up, at how many wait unread in each worker's link: a worker busy with a slow
request neither reads its link nor reports, so what it would get waits behind that request.

A worker is *quiet* when it has given no sign of progress (a report, or a read of its link) for
`STALL_S`, and *stuck* when it is quiet with connections waiting unread. A new connection goes to a
worker not stuck, then to one not quiet with open connections (likely in a slow request), then to
the fewest waiting, then to the fewest open; ties in turn, so equal workers share evenly. When
every worker is stuck, the connection waits in the primary (and the rest in the kernel's backlog)
until the first of them shows progress: one queue for all, as when workers accept from one shared
socket, instead of a queue behind each slow request. Measured under uneven work (bench/policies.py,
one request in ten burning 20 ms): p99 43.9-46.0 ms, against 47.5-60.1 when open connections were
all it ranked by, and 42.0-42.6 with a shared socket.
"""

from __future__ import annotations

import time
from typing import Any

from .round_robin import WINDOW, RoundRobinHandle

STALL_S = 0.001  # a worker with work waiting and no sign of progress for this long is stuck
_clock = time.monotonic


class LeastConnHandle(RoundRobinHandle):
    policy = "least_conn"
    counts = True
    measure_each_wake = True  # pick() ranks by what waits in each link: read it afresh
    recheck_s = STALL_S  # every worker stuck: look again this soon (a report wakes us sooner)

    def __init__(self, servers: Any, hid: int, family: int, addr: Any, backlog: int) -> None:
        super().__init__(servers, hid, family, addr, backlog)
        self.open: dict[int, int] = {}  # handed over and not yet reported closed
        self.unread: dict[int, int] = {}  # waiting in its link when this wake-up began
        self.left: dict[int, int] = {}  # waiting in its link after our last look and hand-offs
        self.heard: dict[int, float] = {}  # when it last showed progress

    def add(self, worker: Any, link: list[int]) -> tuple[dict[str, Any], list[int]]:
        reply, fds = super().add(worker, link)
        self.heard[worker.id] = _clock()
        return {**reply, "report": True}, fds  # the worker tells when its connections close

    def handed(self, worker: Any) -> None:
        self.open[worker.id] = self.open.get(worker.id, 0) + 1

    def finished(self, worker: Any, count: int) -> None:
        self.open[worker.id] = max(0, self.open.get(worker.id, 0) - count)
        self.heard[worker.id] = _clock()
        if self.pending:  # it is free: what waits for a worker goes now
            self.loop.call_soon(self._deliver_pending)

    def load(self, worker_id: int) -> int:
        return self.open.get(worker_id, 0)

    def remove(self, worker: Any) -> None:
        super().remove(worker)  # reads its last reports first
        for table in (self.open, self.unread, self.left, self.heard):
            table.pop(worker.id, None)

    def has_room(self, worker: Any) -> int:
        wid = worker.id
        first = wid not in self.room  # its first look in this wake-up (room is cleared)
        room = super().has_room(worker)
        if first:
            unread = self.unread[wid] = WINDOW - room
            if unread < self.left.get(wid, 0):  # it has read its link since: progress
                self.heard[wid] = _clock()
        return room

    def remeasure(self) -> None:
        """Credits are counted down per connection handed, so WINDOW less a worker's credits is
        what waited in its link after our last look and hand-offs: kept, to see progress at the
        next look. (A blocked link's credits are 0 whatever waits: not kept.)"""
        left, blocked = self.left, self.blocked
        for wid, room in self.room.items():
            if wid not in blocked:
                left[wid] = WINDOW - room
        self.room.clear()

    def _deliver_pending(self) -> None:
        self.remeasure()  # rank on what waits in each link now
        super()._deliver_pending()

    def pick(self) -> Any:
        """The least busy worker with room, or None when every one is stuck (see the module's
        docstring); what was given to a worker in this wake-up does not count against it."""
        order = self.order
        n = len(order)
        stuck_since = _clock() - STALL_S
        best, best_key, best_i = None, (True, True, 0, 0), 0
        for i in range(n):
            worker = order[(self.next + i) % n]
            if self.has_room(worker) <= 0:
                continue
            wid = worker.id
            unread, open_ = self.unread.get(wid, 0), self.open.get(wid, 0)
            quiet = self.heard.get(wid, 0.0) < stuck_since
            key = (quiet and unread > 0, quiet and open_ > 0, unread, open_)
            if best is None or key < best_key:
                best, best_key, best_i = worker, key, i
                if key == (False, False, 0, 0):
                    break
        if best is None or best_key[0]:
            return None
        self.next = (self.next + best_i + 1) % n
        return best
