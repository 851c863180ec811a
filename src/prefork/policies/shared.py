"""SCHED_NONE: the primary binds once and passes the listening socket; each worker accepts itself.

The kernel then wakes whichever worker it likes (measured uneven: bench/policies.py, the Jain
index); this policy trades balance for a primary that does no work per connection.
"""

from __future__ import annotations

from typing import Any

from ..binding import bind_socket
from .base import Handle, close_fds, wire_name


class SharedHandle(Handle):
    policy = "none"

    def __init__(self, servers: Any, hid: int, family: int, addr: Any, backlog: int) -> None:
        super().__init__(servers, hid, family, addr, backlog)
        self.sock = bind_socket(family, addr, backlog)
        self.sockname = wire_name(self.sock)

    def add(self, worker: Any, link: list[int]) -> tuple[dict[str, Any], list[int]]:
        close_fds(link)
        self.workers[worker.id] = worker
        return {"mode": "s", "slots": [0]}, [self.sock.fileno()]

    def close(self) -> None:
        if not self.closed:
            super().close()
            self.sock.close()
