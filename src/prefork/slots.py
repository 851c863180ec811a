"""The supervisor's pool: slots, and the workers (members) that fill them (see supervisor.py).

A slot has at most one worker of its own (`current`) and at most one replacement booting beside it
(`incoming`); all changes of either happen on the primary's loop thread, in supervisor.py and
rolling.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Slot:
    index: int
    restarts: int = 0
    failures: int = 0  # early deaths (or failed starts) in a row
    current: Member | None = None
    incoming: Member | None = None
    timer: Any = None  # a pending `fill`
    removed: bool = False

    @property
    def state(self) -> str:
        if self.removed:
            return "removed"
        if self.incoming is not None:
            return "replacing"
        if self.current is None:
            return "empty"
        return "booting" if self.current.state == "starting" else self.current.state


@dataclass(eq=False)
class Member:
    """One worker the supervisor manages."""

    worker: Any
    slot: Slot
    started: float = field(default_factory=time.monotonic)
    ready_at: float = 0.0
    state: str = "starting"  # starting, ready, draining, hung
    max_requests: int = 0
    why_leaving: str = ""
    waiters: list[Callable[[bool, str], None]] = field(default_factory=list)
    cpu: tuple[float, float] = (0.0, 0.0)
    cpu_percent: float = 0.0
    rss: int = 0
    uss: int | None = None  # private memory: what its exit would free (health.py); None: not read
    pss: int | None = None  # its fair share of what it shares with the template and the other workers
    memory_at: float = 0.0  # when uss and pss are read next
    listens: int = 0  # servers it has listening (ready="listening" waits for all of them)
