"""The primary as an init process: PID 1 of a container, or `--init` (a child subreaper).

A process whose parent exits is reparented to the nearest "subreaper" ancestor, or to PID 1 of its
pid namespace, which must wait() for it or it stays a zombie for good. An app that shells out
(`sh -c "convert ... &"`) leaves such orphans. So when the primary is PID 1, or with `--init` (which
makes it a subreaper with `prctl(PR_SET_CHILD_SUBREAPER)`, so orphans of its workers' children
come to it even when it is not PID 1), it reaps every zombie child it does not own.

It never takes a status someone else waits for: the workers' (primary.py waits for them through
their Popen and pidfd) and the fork template's are left alone, and any other zombie is reaped only
once it has been a zombie for GRACE_S (the primary's own code, e.g. a `prefork run` script's
subprocess.run, collects its child's status at once). Zombies are looked for on SIGCHLD (a handler
only wakes the loop: signals.py) and every CHECK_S as a fallback, always on the loop thread.

A signal without a handler is dropped by the kernel when sent to PID 1 (even SIGTERM, from inside
the namespace), so `guard_pid1` gives SIGTERM a handler at the very start of the command, until the
supervisor installs its own.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
CHECK_S = 1.0
GRACE_S = 0.5
MAX_PER_PASS = 4096  # a fork bomb of orphans must not hold the loop: the rest wait for the next pass


def guard_pid1() -> None:
    """As PID 1, SIGTERM before the supervisor takes over ends the command (exit 0: nothing was
    serving yet) instead of being dropped by the kernel. SIGINT has Python's handler already."""
    if os.getpid() == 1:
        signal.signal(signal.SIGTERM, _early_term)


def _early_term(signum: int, frame: Any) -> None:
    sys.exit(0)


def set_subreaper() -> bool:
    """Become a child subreaper (Linux 3.4+): orphans of our descendants come to us, not to PID 1."""
    try:
        import ctypes  # here: an import the CLI's start pays only with --init

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError, ImportError):
        return False


class Reaper:
    """Reaps the primary's zombie children that nobody else waits for (see the module docstring)."""

    def __init__(self, primary: Any, log: Any = None) -> None:
        self.primary = primary
        self.log = log
        self.reaped = 0
        self.first_seen: dict[int, float] = {}  # zombie pid -> when we first saw it
        self._timer: Any = None
        self._recheck: Any = None
        self._failed = False

    def start(self) -> None:
        """From the main thread, once the primary's loop runs: route SIGCHLD, start the timer."""
        self.primary.signals.handle({signal.SIGCHLD: self.reap})
        self.primary.loop.call_soon(self._tick)

    def _tick(self) -> None:
        self._timer = self.primary.loop.call_later(CHECK_S, self._tick)
        self.reap()

    def owned(self) -> set[int]:
        pids = {w.process.pid for w in list(self.primary.workers.values())}
        template = self.primary.template
        if template is not None:
            pids.add(template.pid)
        return pids

    def reap(self) -> None:
        """On the loop: reap each zombie child that is not ours to leave, once it is old enough."""
        try:
            if _peek() is None:  # no zombie child at all: the usual case, one system call
                self.first_seen.clear()
                return
            zombies = _zombie_children()
        except OSError as exc:
            if not self._failed and self.log is not None:
                self._failed = True
                self.log(f"cannot look for zombie processes: {exc}")
            return
        owned, now = self.owned(), time.monotonic()
        self.first_seen = {pid: self.first_seen.get(pid, now) for pid in zombies if pid not in owned}
        waiting = False
        for pid, seen in list(self.first_seen.items())[:MAX_PER_PASS]:
            if now - seen < GRACE_S:
                waiting = True
                continue
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # its owner waited for it meanwhile
                done = pid
            if done:
                self.reaped += 1
                del self.first_seen[pid]
        if waiting and self._recheck is None:
            self._recheck = self.primary.loop.call_later(GRACE_S, self._recheck_now)

    def _recheck_now(self) -> None:
        self._recheck = None
        self.reap()


def _peek() -> Any:
    """Whether any child is a zombie, without reaping it (WNOWAIT)."""
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # no children at all
        return None


def _zombie_children() -> list[int]:
    """Our children that are zombies, from /proc (each thread's `children` list where the kernel has
    it, else every process's parent pid)."""
    me, pids = os.getpid(), []
    try:
        for tid in os.listdir(f"/proc/{me}/task"):
            with open(f"/proc/{me}/task/{tid}/children", encoding="ascii") as f:
                pids += [int(p) for p in f.read().split()]
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    zombies = []
    for pid in pids:
        stat = _stat(pid)
        if stat is not None and stat[0] == "Z" and int(stat[1]) == me:
            zombies.append(pid)
    return zombies


def _stat(pid: int) -> list[str] | None:
    """State and parent pid, from /proc/PID/stat (after the command name, which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()[:2]


def start_init(primary: Any, log: Any, subreaper: bool) -> Reaper:
    """Reap orphans from now on (from the main thread, once the primary's loop runs); `subreaper`
    (--init) makes them come to us even when we are not PID 1."""
    if subreaper and not set_subreaper():
        log("--init: cannot become a child subreaper (prctl failed): only our own children are reaped")
    reaper = Reaper(primary, log)
    reaper.start()
    return reaper
