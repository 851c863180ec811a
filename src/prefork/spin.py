"""Whether a channel's reader polls for the peer's answer before it sleeps: placement and outcome.

After a process sent a user message, its reader may poll for the answer for a while (channel.py:
a worker's read_messages; inbox.py: the primary's _on_readable) instead of sleeping at once. On
this project's VMs a wake-up across CPUs costs more than a whole round trip (a Python socketpair
ping-pong, one process per CPU: 25k round trips/s sleeping, 155k/s polling), so polling pays, but
only when the peer runs at the same time, on another CPU. When both share one CPU, a poll takes
the CPU from the very peer it waits for (same ping-pong on one CPU: 104k/s sleeping, 88k/s polling).

So a Spin allows polling only when it can help:
- placement: never with PREFORK_IPC_SPIN_US=0, on a machine with one CPU, or when the affinity
  masks of this thread and of every thread of the peer together hold one CPU. Both masks are
  read again every RECHECK seconds (`taskset -p` may move either process at any time);
- outcome: a running average of recent polls that caught the answer in time. Below LOW, polling
  stops (a busy machine, a peer that answers slowly), but one wait in PROBE still polls, so that
  the average comes back up once polling pays again.
Each decision costs a comparison or two; the masks are read at most once per RECHECK.
"""

from __future__ import annotations

import os
import socket
import struct

RECHECK = 1.0  # seconds between two reads of the affinity masks
LOW = 0.3  # below this share of polls that caught the answer, stop polling ...
PROBE = 32  # ... except once every this many waits
WEIGHT = 1 / 8  # of the last outcome in the running average
_CPUS = os.cpu_count() or 1


def cpus_of(pid: int) -> set[int] | None:
    """The CPUs any thread of `pid` may run on (None if it is gone or cannot be read)."""
    cpus: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tasks = [str(pid)]
    for tid in tasks:
        try:
            cpus |= os.sched_getaffinity(int(tid))
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
    return cpus or None


def placement_allows(peer: int | None) -> bool:
    """Whether this thread and `peer` may run at the same time on two CPUs."""
    if _CPUS < 2:
        return False
    own = os.sched_getaffinity(0)  # the calling thread: the reader
    theirs = cpus_of(peer) if peer else None
    if theirs is None:  # not known: only our own mask can say no
        return len(own) > 1
    return len(own | theirs) > 1


def creator_of(sock: socket.socket) -> int | None:
    """The pid that made this socketpair (SO_PEERCRED): from a worker's end, its primary, even when
    its parent is the fork template (template.py)."""
    try:
        pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    except (OSError, AttributeError, struct.error):
        return None
    return pid if pid > 0 and pid != os.getpid() else None


class Spin:
    """The polling decision of one channel's reader (used on its reading thread only)."""

    __slots__ = ("budget", "peer", "placed", "score", "_next_check", "_skipped")

    def __init__(self, budget: float, peer: int | None = None) -> None:
        self.budget = budget  # seconds a wait may poll (PREFORK_IPC_SPIN_US)
        self.peer = peer  # the peer's pid (None: this process's parent)
        self.placed = False  # whether the placement allows polling, as of the last check
        self.score = 1.0  # running share of polls that caught the answer
        self._next_check = 0.0
        self._skipped = 0

    def allowed(self, now: float) -> float:
        """Seconds to poll for the answer to a message sent at `now` (0.0: sleep at once)."""
        if now >= self._next_check:
            self.check(now)
        if not self.placed:
            return 0.0
        if self.score >= LOW:
            return self.budget
        self._skipped += 1
        if self._skipped < PROBE:
            return 0.0
        self._skipped = 0
        return self.budget

    def outcome(self, caught: bool) -> None:
        """A poll ended: it caught the answer in time, or it gave up and slept."""
        self.score += WEIGHT * (caught - self.score)

    def check(self, now: float) -> None:
        """Read the placement again (at most every RECHECK seconds)."""
        self._next_check = now + RECHECK
        if self.budget <= 0:
            self.placed = False
            return
        if self.peer is None:
            self.peer = os.getppid()
        try:
            self.placed = placement_allows(self.peer)
        except OSError:
            self.placed = False
