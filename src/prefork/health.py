"""The supervisor's view of each worker's health: heartbeats, figures from /proc, and `status`.

Runs on the primary's loop thread (a timer every beat), as everything of the supervisor does.
"""

from __future__ import annotations

import os
import time
from typing import Any

KILL_AFTER_ABORT = 1.0
MEMORY_EVERY = 5.0  # seconds between two reads of smaps_rollup when --max-memory does not need each beat
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class Health:
    def __init__(self, supervisor: Any) -> None:
        self.sup = supervisor
        self._told_unreadable = False  # that smaps_rollup cannot be read: said once

    def beat(self) -> None:
        """Ping every worker, sample its figures, and act on what they say; then again."""
        sup = self.sup
        if sup.finished():
            return
        now = time.monotonic()
        for member in list(sup.members.values()):
            worker = member.worker
            if worker.is_connected():
                worker._channel.send_internal(["p"])
            self.sample(member, now)
            self.check(member, now)
        sup.tell("beat")
        sup.primary.loop.call_later(sup.beat_every, self.beat)

    def check(self, member: Any, now: float) -> None:
        sup, worker = self.sup, member.worker
        last = worker.last_beat or member.started
        if member.state == "draining":  # a worker that hangs while it drains is killed after
            if sup.timeout and worker.is_connected() and now - last > sup.timeout:  # `timeout`
                sup.log(f"worker {worker.id} (pid {worker.process.pid}) stopped answering while "
                        f"draining ({now - last:.1f} s, timeout {sup.timeout:g} s): SIGKILL")
                member.state = "hung"
                member.why_leaving += ", killed: it stopped answering"
                worker.kill("SIGKILL")
            return
        if member.state != "ready" or member.slot.incoming is not None:
            return
        if sup.timeout and now - last > sup.timeout:
            sup.log(f"worker {worker.id} (pid {worker.process.pid}) did not answer for {now - last:.1f} s "
                    f"(timeout {sup.timeout:g} s): SIGABRT, then SIGKILL")
            member.state = "hung"
            worker.kill("SIGABRT")
            sup.primary.loop.call_later(KILL_AFTER_ABORT, self._kill_hung, worker.id)
            return
        requests = worker.stats.get("requests", 0)
        if member.max_requests and requests >= member.max_requests:
            sup.rolling.recycle(member, f"served {requests} requests (max {member.max_requests})")
        elif sup.max_memory and member.rss > sup.max_memory:  # USS <= RSS: only then can it be over
            if member.uss is None:  # smaps_rollup unreadable (no ptrace access, an old kernel): RSS
                sup.rolling.recycle(member, f"uses {member.rss >> 20} MiB (RSS: its USS cannot be read; "
                                            f"max {sup.max_memory >> 20} MiB)")
            elif member.uss > sup.max_memory:
                sup.rolling.recycle(member, f"uses {member.uss >> 20} MiB of its own (USS; max "
                                            f"{sup.max_memory >> 20} MiB)")

    def _kill_hung(self, wid: int) -> None:
        member = self.sup.members.get(wid)  # by id: a timer must not keep a dead worker alive
        if member is not None and not member.worker.is_dead():
            member.worker.kill("SIGKILL")

    def sample(self, member: Any, now: float) -> None:
        """RSS, USS, PSS and CPU% from /proc (no dependency); CPU% over the last beat."""
        pid = member.worker.process.pid
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{pid}/statm", "rb") as f:
                member.rss = int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            return
        # a read walks the worker's page tables (about 1 ms per 100 MB): every beat only while RSS
        # is over --max-memory (USS cannot be over before), else every MEMORY_EVERY for `status`
        over = self.sup.max_memory and member.rss > self.sup.max_memory
        if over or now >= member.memory_at:
            member.memory_at = now + MEMORY_EVERY
            member.uss, member.pss = self._private_memory(pid)
        ticks = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        then, before = member.cpu
        if then:
            member.cpu_percent = max(0.0, (ticks - before) / max(1e-6, now - then) * 100)
        member.cpu = (now, ticks)

    def _private_memory(self, pid: int) -> tuple[int | None, int | None]:
        try:
            return private_memory(pid)
        except OSError as exc:
            if not os.path.exists(f"/proc/{pid}"):
                return None, None  # it has just exited
            if not self._told_unreadable:
                self._told_unreadable = True
                self.sup.log(f"cannot read /proc/{pid}/smaps_rollup ({exc.strerror}): workers' USS is "
                             "unknown, and --max-memory compares RSS")
            return None, None

    def rows(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        rows = []
        for member in sorted(self.sup.members.values(), key=lambda m: m.worker.id):
            stats = member.worker.stats
            rows.append({
                "id": member.worker.id, "pid": member.worker.process.pid, "state": member.state,
                "slot": member.slot.index, "uptime": round(now - member.started, 3),
                "restarts": member.slot.restarts, "connections": stats.get("connections", 0),
                "requests": stats.get("requests", 0), "in_flight": stats.get("in_flight", 0),
                "rss": member.rss, "uss": member.uss, "pss": member.pss,
                "cpu": round(member.cpu_percent, 1),
            })
        return rows

    def status(self) -> dict[str, Any]:
        """What `ctl status --json` and the admin /status show."""
        import prefork

        sup = self.sup
        return {"pid": os.getpid(), "version": prefork.__version__, "policy": prefork.scheduling_policy,
                "workers": self.rows(), "target": len(sup.slots), "stopping": sup.stopping,
                "ready": sup.readiness()[0], "restarts": sup.restarts_total, "reloads": dict(sup.reloads),
                "workers_how": self._how(),
                "slots": [slot.state for slot in sup.slots], "reload": dict(sup.rolling.status),
                "last_error": sup.last_error, "addresses": self.addresses(),
                **({"templates": sup.code.describe()} if sup.code is not None else {})}

    def _how(self) -> str:
        """How the worker count was found; after a scale, that it was scaled from it."""
        how, now = self.sup.workers_how, len(self.sup.slots)
        if how.split(" ", 1)[0] == str(now):
            return how
        return f"{now} (scaled; at start {how})"

    def addresses(self) -> list[str]:
        from .address import Address

        out = []
        for handle in self.sup.primary.servers.by_id.values():
            name = handle.sockname
            name = name if isinstance(name, str) else tuple(name)
            out.append(str(Address.from_sockname(handle.family, name)))
        return out


def private_memory(pid: int) -> tuple[int, int]:
    """(USS, PSS) in bytes from /proc/PID/smaps_rollup (Linux 4.14+; reading it needs ptrace access
    to the process, which a container without CAP_SYS_PTRACE lacks for another user's): OSError.

    RSS counts every page a worker maps, also those it shares copy-on-write with the template it
    was forked from and with its siblings: with a preloaded app each worker shows the whole app,
    and RSS tells nothing about a leak. USS (Private_Clean + Private_Dirty) is what the worker alone
    holds, so what grows when it leaks, and what its exit gives back; --max-memory compares that.
    A read walks the process's page tables: about 0.3 ms for a small serve worker, 1 ms per 100 MB."""
    with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
        text = f.read()
    uss = pss = 0
    for line in text.splitlines():
        key, _, rest = line.partition(b":")
        if key in (b"Private_Clean", b"Private_Dirty", b"Private_Hugetlb"):
            uss += int(rest.split()[0]) << 10
        elif key == b"Pss":
            pss = int(rest.split()[0]) << 10
    return uss, pss
