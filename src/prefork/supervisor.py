"""Supervision in the primary: keep N workers, back off crash loops, roll reloads, scale, liveness.

Node leaves all of this to its users. One `Supervisor` owns the pool; all its state is touched on
the primary's loop thread only (cluster events and timers run there), and its public methods hand
work over to that thread, so they may be called from any thread or a signal handler.

A pool is a list of slots; a slot's worker is replaced in place (on a crash, a reload, recycling),
so "restarts" is counted per slot, as a person reading `status` expects.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import prefork

BACKOFF_MIN, BACKOFF_MAX = 0.1, 10.0
MIN_UPTIME = 1.0  # a worker that dies sooner after it was ready counts as a crash loop
GIVE_UP_AFTER = 5  # boot failures in a row, with no worker ever ready, before giving up
BEAT_EVERY = 1.0
KILL_AFTER_ABORT = 1.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Slot:
    index: int
    restarts: int = 0
    failures: int = 0  # early deaths in a row
    member: Member | None = None
    timer: Any = None  # a pending delayed respawn


@dataclass
class Member:
    """One worker the supervisor manages."""

    worker: Any
    slot: Slot
    started: float = field(default_factory=time.monotonic)
    ready_at: float = 0.0
    state: str = "starting"  # starting, ready, draining
    max_requests: int = 0
    why_leaving: str = ""
    waiters: list[Callable[[bool, str], None]] = field(default_factory=list)
    cpu: tuple[float, float] = (0.0, 0.0)
    cpu_percent: float = 0.0
    rss: int = 0
    replacing: bool = False


class Supervisor:
    """Keeps `workers` workers running; see the module docstring."""

    def __init__(self, workers: int, *, timeout: float | None = None, graceful_timeout: float = 30.0,
                 max_requests: int = 0, max_requests_jitter: int = 0, max_memory: int | None = None,
                 ready: str = "listening", ready_timeout: float = 30.0, reload_batch: int = 1,
                 on_log: Callable[[str], None] | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        if ready not in ("listening", "online", "message"):
            raise ValueError(f"ready must be 'listening', 'online' or 'message', not {ready!r}")
        self.count = workers
        self.timeout = timeout
        self.graceful_timeout = graceful_timeout
        self.max_requests, self.max_requests_jitter = max_requests, max_requests_jitter
        self.max_memory = max_memory
        self.ready_mode, self.ready_timeout = ready, ready_timeout
        # several beats per timeout, so one late answer is not taken for a hung worker
        self._beat_every = min(BEAT_EVERY, timeout / 4) if timeout else BEAT_EVERY
        self.reload_batch = max(1, reload_batch)
        self.log = on_log or _default_log
        self.slots: list[Slot] = []
        self.members: dict[int, Member] = {}
        self.stopping = False
        self.exit_code = 0
        self.ever_ready = False
        self._done = threading.Event()
        self._reloading = False
        self._reload_again = False
        self._sigints = 0
        self._primary = prefork._primary
        if self._primary is None:
            raise RuntimeError("a Supervisor runs in the primary")

    # -- public: any thread ----------------------------------------------------------------------

    def start(self) -> None:
        """Fork the workers; in the main thread also take HUP, TERM, INT, TTIN and TTOU."""
        loop = self._primary.start()
        for event in ("listening", "online", "message", "exit"):
            prefork.on(event, getattr(self, f"_on_{event}"))
        if threading.current_thread() is threading.main_thread():
            self._install_signals()
        loop.run_sync(self._start)

    def reload(self) -> None:
        self._post(self._reload)

    def scale(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"cannot scale to {n!r}: need a whole number of workers, at least 1")
        self._post(self._scale, n)

    def stop(self, graceful: bool = True) -> None:
        self._post(self._stop, graceful)

    def status(self) -> dict[str, Any]:
        return self._primary.loop.run_sync(self._status, timeout=5.0)

    def wait(self) -> int:
        """Block until the pool has stopped; the exit code (0 after a graceful stop)."""
        while not self._done.wait(0.5):
            pass
        return self.exit_code

    # -- loop thread -----------------------------------------------------------------------------

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        self._primary.loop.call_soon(fn, *args)

    def _start(self) -> None:
        self.slots = [Slot(i) for i in range(self.count)]
        for slot in self.slots:
            self._spawn(slot)
        self._primary.loop.call_later(self._beat_every, self._beat)

    def _spawn(self, slot: Slot, replacing: Member | None = None) -> Member | None:
        """Fork a worker for `slot` (beside `replacing`, which keeps serving until this one is ready)."""
        slot.timer = None
        if self.stopping:
            return None
        try:
            worker = self._primary.fork({"PREFORK_SUPERVISED": "1"}, own_group=True)
        except Exception as exc:
            self.log(f"cannot start a worker: {exc}")
            self._give_up(f"cannot start a worker: {exc}")
            return None
        member = Member(worker, slot, max_requests=self._request_limit())
        self.members[worker.id] = member
        if replacing is None:
            slot.member = member
        self._primary.loop.call_later(self.ready_timeout, self._ready_timed_out, member)
        return member

    def _request_limit(self) -> int:
        if not self.max_requests:
            return 0
        return self.max_requests + random.randint(0, max(0, self.max_requests_jitter))

    # -- readiness -------------------------------------------------------------------------------

    def _on_online(self, worker: Any) -> None:
        if self.ready_mode == "online":
            self._ready(worker)

    def _on_listening(self, worker: Any, address: Any) -> None:
        if self.ready_mode == "listening":
            self._ready(worker)

    def _on_message(self, worker: Any, message: Any, handle: Any) -> None:
        if self.ready_mode == "message" and message == "ready":
            self._ready(worker)

    def _ready(self, worker: Any) -> None:
        member = self.members.get(worker.id)
        if member is None or member.state != "starting":
            return
        member.state = "ready"
        member.ready_at = time.monotonic()
        self.ever_ready = True
        self.log(f"worker {worker.id} (pid {worker.process.pid}) is ready")
        self._settle(member, True, "")

    def _settle(self, member: Member, ok: bool, why: str) -> None:
        waiters, member.waiters = member.waiters, []
        for waiter in waiters:
            waiter(ok, why)

    def _ready_timed_out(self, member: Member) -> None:
        if member.state == "starting" and member.worker.id in self.members:
            why = f"not ready after {self.ready_timeout:g} s"
            self.log(f"worker {member.worker.id} (pid {member.worker.process.pid}) is {why}: stopping it")
            self._settle(member, False, why)
            self._retire(member, why, graceful=False)

    # -- exits and respawn -----------------------------------------------------------------------

    def _on_exit(self, worker: Any, code: int | None, signame: str | None) -> None:
        member = self.members.pop(worker.id, None)
        if member is None:
            return
        how = f"signal {signame}" if signame else f"code {code}"
        fatal = getattr(worker, "fatal", None)
        if member.state == "starting":
            self._settle(member, False, fatal["error"] if fatal else f"exited with {how}")
        slot = member.slot
        if member.state == "draining" or self.stopping:
            self.log(f"worker {worker.id} (pid {worker.process.pid}) stopped ({member.why_leaving or how})")
            self._check_done()
            return
        if slot.member is not member:  # a replacement that failed: the reload reports it
            return
        self._respawn_later(member, how, fatal)

    def _respawn_later(self, member: Member, how: str, fatal: dict[str, str] | None) -> None:
        slot = member.slot
        worker = member.worker
        early = member.state == "starting" or time.monotonic() - member.ready_at < MIN_UPTIME
        slot.failures = slot.failures + 1 if early else 0
        slot.restarts += 1
        slot.member = None
        if fatal is not None:
            if slot.failures <= 1 or not early:
                sys.stderr.write(fatal["traceback"])
            how = f"{how}: {fatal['error']}"
        if early and not self.ever_ready and slot.failures >= GIVE_UP_AFTER:
            self._give_up(f"workers cannot boot ({slot.failures} attempts); last: {how}")
            return
        # The first crash restarts at once; a crash loop backs off 0.1 s, 0.2 s, ... up to 10 s.
        delay = 0.0 if slot.failures <= 1 else min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (slot.failures - 2))
        self.log(f"worker {worker.id} (pid {worker.process.pid}) died ({how}); "
                 f"starting a new one{f' in {delay:g} s' if delay else ''}")
        slot.timer = self._primary.loop.call_later(delay, self._spawn, slot)

    def _give_up(self, why: str) -> None:
        if self.stopping:
            return
        self.log(f"giving up: {why}")
        self.exit_code = 3
        self._stop(graceful=False)

    # -- draining one worker ---------------------------------------------------------------------

    def _retire(self, member: Member, why: str, graceful: bool = True) -> None:
        """Drain a worker (graceful) or kill it; kill it anyway after graceful_timeout."""
        if member.state == "draining":
            return
        member.state = "draining"
        member.why_leaving = why
        worker = member.worker
        if graceful and worker.is_connected():
            worker.disconnect()
            self._primary.loop.call_later(self.graceful_timeout, self._force, member)
        else:
            worker.kill("SIGTERM")
            self._primary.loop.call_later(min(5.0, self.graceful_timeout), self._force, member)

    def _force(self, member: Member) -> None:
        if member.worker.id in self.members and not member.worker.is_dead():
            worker = member.worker
            self.log(f"worker {worker.id} (pid {worker.process.pid}) did not stop in time: SIGKILL")
            member.why_leaving += ", killed after the graceful timeout"
            member.worker.kill("SIGKILL")

    # -- replacing: reload, recycling ------------------------------------------------------------

    def _replace(self, slot: Slot, why: str, done: Callable[[bool, str], None]) -> None:
        """Start a new worker for `slot`; once it is ready, drain the old one. Else keep the old."""
        old = slot.member
        if old is not None:
            old.replacing = True
        new = self._spawn(slot, replacing=old)
        if new is None:
            done(False, "could not fork")
            return

        def settled(ok: bool, reason: str) -> None:
            if old is not None:
                old.replacing = False
            if not ok:
                if new.worker.id in self.members:
                    self._retire(new, "failed to become ready", graceful=False)
                done(False, reason)
                return
            slot.member = new
            if old is not None and old.worker.id in self.members:
                self._retire(old, why)
            done(True, "")

        new.waiters.append(settled)

    def _reload(self) -> None:
        if self.stopping:
            return
        if self._reloading:
            self._reload_again = True
            return
        self._reloading = True
        self.log(f"reloading {len(self.slots)} worker(s), {self.reload_batch} at a time")
        self._reload_step(list(self.slots))

    def _reload_step(self, todo: list[Slot]) -> None:
        if not todo or self.stopping:
            self._reload_finished(True, "")
            return
        batch, rest = todo[: self.reload_batch], todo[self.reload_batch:]
        remaining = [len(batch)]
        failures: list[str] = []

        def one_done(ok: bool, why: str) -> None:
            if not ok:
                failures.append(why)
            remaining[0] -= 1
            if remaining[0] == 0:
                if failures:
                    self._reload_finished(False, failures[0])
                else:
                    self._reload_step(rest)

        for slot in batch:
            self._replace(slot, "reload", one_done)

    def _reload_finished(self, ok: bool, why: str) -> None:
        self._reloading = False
        if ok:
            self.log("reload done")
        else:
            self.log(f"reload failed, the old workers keep serving: {why}")
        if self._reload_again:
            self._reload_again = False
            self._reload()

    # -- scaling ---------------------------------------------------------------------------------

    def _scale(self, n: int) -> None:
        if self.stopping:
            return
        current = len(self.slots)
        self.log(f"scaling from {current} to {n} worker(s)")
        for index in range(current, n):
            slot = Slot(index)
            self.slots.append(slot)
            self._spawn(slot)
        while len(self.slots) > n:
            slot = self.slots.pop()
            if slot.timer is not None:
                slot.timer.cancel()
            if slot.member is not None:
                self._retire(slot.member, "scaled down")
        self.count = n

    # -- stopping --------------------------------------------------------------------------------

    def _stop(self, graceful: bool) -> None:
        if self.stopping and graceful:
            return
        self.stopping = True
        if graceful:
            self._primary.servers.stop_accepting()
        for slot in self.slots:
            if slot.timer is not None:
                slot.timer.cancel()
        for member in list(self.members.values()):
            if graceful:
                self._retire(member, "stopping")
            else:
                member.state = "draining"
                member.why_leaving = member.why_leaving or "stopped at once"
                member.worker.kill("SIGKILL")
        self._check_done()

    def _check_done(self) -> None:
        if self.stopping and not self.members:
            self._done.set()

    # -- liveness, recycling and figures ---------------------------------------------------------

    def _beat(self) -> None:
        if self._done.is_set():
            return
        now = time.monotonic()
        for member in list(self.members.values()):
            worker = member.worker
            if worker.is_connected():
                worker._channel.send_internal(["p"])
            self._sample(member, now)
            self._check_health(member, now)
        self._primary.loop.call_later(self._beat_every, self._beat)

    def _check_health(self, member: Member, now: float) -> None:
        worker = member.worker
        if member.state != "ready" or member.replacing:
            return
        last = getattr(worker, "last_beat", None) or member.started
        if self.timeout and now - last > self.timeout:
            self.log(f"worker {worker.id} (pid {worker.process.pid}) did not answer for {now - last:.1f} s "
                     f"(timeout {self.timeout:g} s): SIGABRT, then SIGKILL")
            member.state = "hung"
            worker.kill("SIGABRT")
            self._primary.loop.call_later(KILL_AFTER_ABORT, self._kill_hung, member)
            return
        stats = getattr(worker, "stats", None) or {}
        if member.max_requests and stats.get("requests", 0) >= member.max_requests:
            self._recycle(member, f"served {stats['requests']} requests (max {member.max_requests})")
        elif self.max_memory and member.rss > self.max_memory:
            self._recycle(member, f"uses {member.rss >> 20} MiB (max {self.max_memory >> 20} MiB)")

    def _kill_hung(self, member: Member) -> None:
        if not member.worker.is_dead():
            member.worker.kill("SIGKILL")

    def _recycle(self, member: Member, why: str) -> None:
        self.log(f"worker {member.worker.id} (pid {member.worker.process.pid}) {why}: replacing it")
        self._replace(member.slot, why, lambda ok, reason: None if ok else self.log(
            f"could not replace worker {member.worker.id}: {reason}"))

    def _sample(self, member: Member, now: float) -> None:
        """RSS and CPU% from /proc (no dependency); CPU% over the last beat."""
        pid = member.worker.process.pid
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{pid}/statm", "rb") as f:
                member.rss = int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            return
        ticks = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        then, before = member.cpu
        if then:
            member.cpu_percent = max(0.0, (ticks - before) / max(1e-6, now - then) * 100)
        member.cpu = (now, ticks)

    def _status(self) -> dict[str, Any]:
        now = time.monotonic()
        rows = []
        for member in sorted(self.members.values(), key=lambda m: m.worker.id):
            stats = getattr(member.worker, "stats", None) or {}
            rows.append({
                "id": member.worker.id, "pid": member.worker.process.pid, "state": member.state,
                "uptime": round(now - member.started, 3), "restarts": member.slot.restarts,
                "connections": stats.get("connections", 0), "requests": stats.get("requests", 0),
                "in_flight": stats.get("in_flight", 0), "rss": member.rss,
                "cpu": round(member.cpu_percent, 1),
            })
        return {"pid": os.getpid(), "version": prefork.__version__, "policy": prefork.scheduling_policy,
                "workers": rows, "target": len(self.slots), "stopping": self.stopping,
                "addresses": self._addresses()}

    def _addresses(self) -> list[str]:
        from .address import Address

        servers = self._primary.servers
        out = []
        for handle in servers.by_id.values():
            name = handle.sockname
            name = name if isinstance(name, str) else tuple(name)
            out.append(str(Address.from_sockname(handle.family, name)))
        return out

    # -- signals ---------------------------------------------------------------------------------

    def _install_signals(self) -> None:
        """Handlers only hand the work to the loop (FACTS: Python handlers run between bytecodes)."""
        handlers = {
            signal.SIGHUP: lambda: self._post(self._reload),
            signal.SIGTERM: lambda: self._post(self._stop, True),
            signal.SIGINT: self._on_sigint,
            signal.SIGTTIN: lambda: self._post(self._scale, len(self.slots) + 1),
            signal.SIGTTOU: lambda: self._post(self._scale, max(1, len(self.slots) - 1)),
        }
        for signum, fn in handlers.items():
            signal.signal(signum, lambda s, f, fn=fn: fn())

    def _on_sigint(self) -> None:
        """First Ctrl-C drains; a second one stops at once."""
        self._sigints += 1
        if self._sigints == 1:
            self.log("stopping gracefully (Ctrl-C again to stop at once)")
            self._post(self._stop, True)
        else:
            self.exit_code = 130
            self._post(self._stop, False)


def _default_log(line: str) -> None:
    sys.stderr.write(f"[prefork] {line}\n")
    sys.stderr.flush()


def supervise(workers: int | None = None, **options: Any) -> Supervisor:
    """Start a supervised pool of `workers` (default: one per core) and return its Supervisor."""
    supervisor = Supervisor(workers or os.cpu_count() or 1, **options)
    supervisor.start()
    return supervisor

