"""SCHED_LEAST_CONN: like round robin, but each connection goes to the worker with the fewest open.

Workers report, cheaply and in batches, how many of their connections have closed; the primary
counts a worker's open connections as those it handed over less those reported closed (waiting in
the link, being served: both are load). Under uneven work (some slow requests) a busy worker stops
getting new connections while it is busy, which round robin cannot know. Ties go round robin, so
equal workers still share evenly.
"""

from __future__ import annotations

from typing import Any

from .round_robin import RoundRobinHandle


class LeastConnHandle(RoundRobinHandle):
    policy = "least_conn"
    counts = True

    def __init__(self, servers: Any, hid: int, family: int, addr: Any, backlog: int) -> None:
        super().__init__(servers, hid, family, addr, backlog)
        self.open: dict[int, int] = {}  # handed over and not yet reported closed

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

    def pick(self) -> Any:
        order = self.order
        n = len(order)
        best, best_load, best_i = None, 0, 0
        for i in range(n):
            worker = order[(self.next + i) % n]
            if self.has_room(worker) <= 0:
                continue
            load = self.open.get(worker.id, 0)
            if best is None or load < best_load:
                best, best_load, best_i = worker, load, i
                if load == 0:
                    break
        if best is not None:
            self.next = (self.next + best_i + 1) % n
        return best
