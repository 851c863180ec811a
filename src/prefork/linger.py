"""The end of a stopping pool's drain: connections that land late on refusing sockets.

When the pool stops, the primary makes its listening sockets refuse new connections
(binding.refuse_new), but a handshake under way still completes, late when the machine is busy.
Closing the socket would reset it, so a draining server keeps taking what lands on a refusing
listener (servers.py: Listener.refusing) until none has come for LINGER_S, at most LINGER_MAX_S,
then closes it. `take(listener)` serves what waits on a listener and says whether anything did.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

LINGER_S = 0.02
LINGER_MAX_S = 0.5


async def linger(listeners: list[Any], take: Callable[[Any], bool]) -> None:
    """For a server on an event loop: the loop serves on while this waits."""
    import asyncio

    until = time.monotonic() + LINGER_MAX_S
    came = True
    while came and time.monotonic() < until:
        await asyncio.sleep(LINGER_S)
        came = any([take(listener) for listener in listeners])  # a list: every listener is taken


def linger_blocking(listeners: list[Any], take: Callable[[Any], bool]) -> None:
    """For a threaded server, on its drain thread: wakes as soon as a connection lands."""
    until = time.monotonic() + LINGER_MAX_S
    while time.monotonic() < until and any([listener.wait_pending(LINGER_S) for listener in listeners]):
        for listener in listeners:
            take(listener)
