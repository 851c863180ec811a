"""SCHED_LEAST_CONN: like round robin, but each connection goes to the worker with the fewest open.

Workers report, cheaply and in batches, how many of their connections have closed; the primary
counts a worker's open connections as those it handed over less those reported closed. First,
though, it looks at how many wait unread in each worker's link: a worker busy with a slow request
does not read its link, so what it would get waits behind that request. Under uneven work (some
slow requests) a busy worker stops getting new connections while it is busy, which round robin
cannot know. Ties go round robin, so equal workers still share evenly.
"""

from __future__ import annotations

from typing import Any

from .round_robin import WINDOW, RoundRobinHandle


class LeastConnHandle(RoundRobinHandle):
    policy = "least_conn"
    counts = True
    measure_each_wake = True  # pick() ranks by what waits in each link: read it afresh

    def __init__(self, servers: Any, hid: int, family: int, addr: Any, backlog: int) -> None:
        super().__init__(servers, hid, family, addr, backlog)
        self.open: dict[int, int] = {}  # handed over and not yet reported closed
        self.unread: dict[int, int] = {}  # waiting in its link when this wake-up began

    def add(self, worker: Any, link: list[int]) -> tuple[dict[str, Any], list[int]]:
        reply, fds = super().add(worker, link)
        return {**reply, "report": True}, fds  # the worker tells when its connections close

    def handed(self, worker: Any) -> None:
        self.open[worker.id] = self.open.get(worker.id, 0) + 1

    def finished(self, worker: Any, count: int) -> None:
        self.open[worker.id] = max(0, self.open.get(worker.id, 0) - count)

    def load(self, worker_id: int) -> int:
        return self.open.get(worker_id, 0)

    def remove(self, worker: Any) -> None:
        super().remove(worker)  # reads its last reports first
        self.open.pop(worker.id, None)
        self.unread.pop(worker.id, None)

    def has_room(self, worker: Any) -> int:
        first = worker.id not in self.room  # its first look in this wake-up (room is cleared)
        room = super().has_room(worker)
        if first:
            self.unread[worker.id] = WINDOW - room
        return room

    def pick(self) -> Any:
        """The worker with the fewest connections unread in its link as this wake-up began (one
        that does not read is busy: what it gets waits behind its work; what was given to a
        worker that reads does not count against it), then the fewest open; ties in turn."""
        order = self.order
        n = len(order)
        best, best_key, best_i = None, (0, 0), 0
        for i in range(n):
            worker = order[(self.next + i) % n]
            room = self.has_room(worker)
            if room <= 0:
                continue
            key = (self.unread.get(worker.id, 0), self.open.get(worker.id, 0))
            if best is None or key < best_key:
                best, best_key, best_i = worker, key, i
                if key == (0, 0):
                    break
        if best is not None:
            self.next = (self.next + best_i + 1) % n
        return best
