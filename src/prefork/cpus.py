"""How many CPUs this process may use: `--workers auto`.

`os.cpu_count()` counts the host's CPUs. A container limited to 2 CPUs on a 64-core node must not
start 64 workers, so `auto` is the affinity mask (`taskset`, cpusets) capped by the cgroup CPU quota
(v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up, and at least 1.
"""

from __future__ import annotations

import math
import os


class AutoCount(int):
    """A worker count found by `usable()`; `how` says how, for the banner and `ctl status`."""

    how: str

    def __new__(cls, n: int, how: str) -> AutoCount:
        self = super().__new__(cls, n)
        self.how = how
        return self


def usable(root: str = "/sys/fs/cgroup", proc_self: str = "/proc/self/cgroup") -> AutoCount:
    """The CPUs this process may use, e.g. AutoCount(2, "2 (cgroup quota 2.0 of 64 CPUs)")."""
    host = os.cpu_count() or 1
    try:
        mask = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mask = host
    quota = cgroup_quota(root, proc_self)
    n, parts = mask, []
    if mask < host:
        parts.append(f"affinity {mask} of {host} CPUs")
    if quota is not None and math.ceil(quota) <= n:  # said even when it rounds up to the mask
        n = max(1, math.ceil(quota))
        parts.insert(0, f"cgroup quota {quota:.1f} of {host} CPUs")
    n = max(1, n)
    return AutoCount(n, f"{n} ({', '.join(parts)})" if parts else f"{n} (CPUs)")


def cgroup_quota(root: str = "/sys/fs/cgroup", proc_self: str = "/proc/self/cgroup") -> float | None:
    """The CPU quota in CPUs (1.5 = one and a half), or None when there is none.

    The smallest limit from the process's cgroup up to the root: a parent's limit binds its
    children, whose own file may well say "max" (or -1)."""
    paths = _cgroup_paths(proc_self)
    found: list[float] = []
    v2 = paths.get("")
    if v2 is not None:  # "unified": where a hybrid (v1 and v2) host mounts the v2 hierarchy
        for base in (root, os.path.join(root, "unified")):
            found += [q for q in (_read_v2(os.path.join(f, "cpu.max")) for f in _up_from(base, v2)) if q]
    for key, path in paths.items():
        if key and "cpu" in key.split(","):
            bases = dict.fromkeys((os.path.join(root, key), os.path.join(root, "cpu"),
                                   os.path.join(root, "cpu,cpuacct")))
            for base in bases:  # the same folder under two names (a symlink) is read twice: harmless
                found += [q for q in (_read_v1(f) for f in _up_from(base, path)) if q]
    return min(found) if found else None


def _cgroup_paths(proc_self: str) -> dict[str, str]:
    """{controllers: path} from /proc/self/cgroup ("" is the v2 unified hierarchy)."""
    out: dict[str, str] = {}
    try:
        with open(proc_self, encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) == 3:
                    out[parts[1]] = parts[2]
    except OSError:
        pass
    return out


def _up_from(base: str, path: str) -> list[str]:
    """The cgroup's folder and its parents up to the mount (a limit may be set higher up); inside a
    container the path in /proc/self/cgroup may not exist under the mount: then the mount itself."""
    folders = []
    parts = [p for p in path.split("/") if p and p != ".."]
    for i in range(len(parts), -1, -1):
        folder = os.path.join(base, *parts[:i])
        if os.path.isdir(folder):
            folders.append(folder)
    return folders


def _read_v2(path: str) -> float | None:
    """cpu.max: "max 100000" (no limit: 0.0) or "200000 100000" (2 CPUs); None if unreadable."""
    try:
        with open(path, "rb") as f:  # bytes: no codec lookup (it imports, which may be refused)
            quota, _, period = f.read().decode("utf-8", "replace").strip().partition(" ")
    except OSError:
        return None
    if quota == "max":
        return 0.0
    try:
        value = int(quota) / int(period or "100000")
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else 0.0


def _read_v1(folder: str) -> float | None:
    try:
        with open(os.path.join(folder, "cpu.cfs_quota_us"), "rb") as f:
            quota = int(f.read().strip())
        with open(os.path.join(folder, "cpu.cfs_period_us"), "rb") as f:
            period = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return 0.0
    return quota / period
