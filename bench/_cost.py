"""Where a server's CPU and file descriptors go, read from /proc, for bench/serve.py: utime and stime
of a server's main process and of every descendant (workers, templates), its fd limit and its open
sockets. Linux only, standard library only."""

from __future__ import annotations

import os
import re
import resource
from pathlib import Path

from _procs import descendants
from targets_serve import CPU_PARTS

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- where the CPU goes ----------------------------------------------------------------------------

Ticks = tuple[int, int]  # utime, stime in clock ticks (all threads of a process)


def _ticks(pid: int) -> Ticks | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]), int(fields[12])  # proc(5) fields 14 and 15; fields[0] is field 3 (state)


def cpu_sample(root: int) -> dict[int, Ticks]:
    """pid -> (utime, stime) of `root` and every live descendant (gunicorn, granian, uvicorn, Node
    and prefork all run workers below their main process; prefork also a template)."""
    out = {}
    for pid in [root, *descendants(root)]:
        if (t := _ticks(pid)) is not None:
            out[pid] = t
    return out


def cpu_per_request(
    root: int, before: dict[int, Ticks], after: dict[int, Ticks], requests: int
) -> dict[str, float]:
    """CPU microseconds per request: the main process's and its descendants', user and kernel. A
    descendant that started meanwhile counts from zero; one that exited meanwhile is lost (noted)."""
    scale = 1e6 / CLK_TCK / max(1, requests)
    out = dict.fromkeys(CPU_PARTS, 0.0)
    for pid, (user, kernel) in after.items():
        user0, kernel0 = before.get(pid, (0, 0))
        who = "primary" if pid == root else "workers"
        out[f"{who} user"] += (user - user0) * scale
        out[f"{who} kernel"] += (kernel - kernel0) * scale
    out["total"] = sum(out[p] for p in CPU_PARTS)
    out["exited"] = len(set(before) - set(after))
    return out


# -- file descriptors ------------------------------------------------------------------------------


def raise_nofile(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to `needed` (at most the hard limit) before wrk and the
    servers start: they inherit it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def nofile_of(pids: list[int]) -> int | None:
    """The lowest soft "Max open files" of these processes (a server may lower its own)."""
    limits = []
    for pid in pids:
        try:
            m = re.search(r"^Max open files\s+(\d+|unlimited)", Path(f"/proc/{pid}/limits").read_text(), re.M)
        except OSError:
            continue
        if m:
            limits.append(1 << 62 if m.group(1) == "unlimited" else int(m.group(1)))
    return min(limits) if limits else None


def open_sockets(pids: list[int]) -> int:
    """Sockets open in these processes: mid-run, a server that stopped accepting at its fd limit holds
    fewer than wrk's connections (the servers measured here mostly say nothing about EMFILE)."""
    count = 0
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            except OSError:
                pass
    return count
