"""Scheduling policies: how the connections of one shared address reach the workers.

- `rr` (round_robin.py): the primary accepts and hands each connection to the next worker in turn,
  over the worker's hand-off link (handoff.py).
- `least_conn` (least_conn.py): as rr, but to the worker with the fewest open connections.
- `none` (shared.py): every worker gets the one listening socket and accepts by itself.
- `reuseport` (reuseport.py): one SO_REUSEPORT socket per worker; the kernel balances by hash.
"""

from __future__ import annotations

import socket
from typing import Any

from .base import Handle


def make_handle(policy: str, servers: Any, hid: int, family: int, addr: Any, backlog: int) -> Handle:
    if policy == "reuseport" and family == socket.AF_UNIX:
        policy = "none"  # SO_REUSEPORT means nothing for unix sockets: all workers share one
    if policy == "rr":
        from .round_robin import RoundRobinHandle as cls
    elif policy == "least_conn":
        from .least_conn import LeastConnHandle as cls
    elif policy == "none":
        from .shared import SharedHandle as cls
    elif policy == "reuseport":
        from .reuseport import ReusePortHandle as cls
    else:
        raise ValueError(f"unknown scheduling policy {policy!r}")
    return cls(servers, hid, family, addr, backlog)
