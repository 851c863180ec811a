"""Supervision in the primary: keep N workers, back off crash loops, roll reloads, scale, liveness.

Node leaves all of this to its users. One `Supervisor` owns the pool; all its state is touched on
the primary's loop thread only (cluster events, timers and signals run there: signals.py), and its
public methods post work to that thread, so they may be called from any thread.

The pool is a list of slots. Each slot has at most one worker of its own (`current`) and at most
one replacement booting beside it (`incoming`, during a reload or a recycling); every change of
either happens in one of the methods below, on the loop thread:
- empty -> booting: `fill` forks a worker (at start, and after a death, possibly after a backoff);
- booting -> ready: the worker listens (or is online, or says "ready");
- ready -> replacing: `Rolling.replace` (rolling.py) forks the incoming worker; once it is ready
  it becomes current and the old one drains; if it fails, the old one keeps serving;
- a current worker that dies while its replacement boots hands the slot to the replacement (no
  third worker); one that dies otherwise leaves the slot empty until `fill`;
- a slot removed by scaling down gets nothing started again.
"restarts" is counted per slot, as a person reading `status` expects.

Others follow the pool through `watchers` (systemd's notify socket, the admin endpoint, metrics):
each gets `on_<event>(...)` calls, on the loop thread, for the events listed at `tell`.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _role, _stdio
from .health import Health
from .rolling import Rolling
from .sighandlers import SignalHandlers
from .slots import Member, Slot

BACKOFF_MIN, BACKOFF_MAX = 0.1, 10.0
MIN_UPTIME = 1.0  # a worker that dies sooner after it was ready counts as a crash loop
GIVE_UP_AFTER = 5  # boot failures in a row, with no worker ever ready, before giving up
BEAT_EVERY = 1.0
MAX_WORKERS = 1024  # what `--workers` and `ctl scale` accept (cli/config.py)


class Supervisor(SignalHandlers):
    """Keeps `workers` workers running; see the module docstring."""

    def __init__(self, workers: int, *, timeout: float | None = None, graceful_timeout: float = 30.0,
                 max_requests: int = 0, max_requests_jitter: int = 0, max_memory: int | None = None,
                 ready: str = "listening", ready_timeout: float = 30.0, reload_batch: int = 1,
                 shutdown_delay: float = 0.0, ready_listens: int = 1,
                 on_log: Callable[[str], None] | None = None, primary: Any = None) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers!r}")
        if ready not in ("listening", "online", "message"):
            raise ValueError(f"ready must be 'listening', 'online' or 'message', not {ready!r}")
        self.primary = primary if primary is not None else _role.require_primary("a Supervisor")
        self.count = workers
        self.timeout = timeout
        self.graceful_timeout = graceful_timeout
        self.max_requests, self.max_requests_jitter = max_requests, max_requests_jitter
        self.max_memory = max_memory
        self.ready_mode, self.ready_timeout = ready, ready_timeout
        self.ready_listens = max(1, ready_listens)  # a server on 2 addresses is ready on both
        # several beats per timeout, so one late answer is not taken for a hung worker
        self.beat_every = min(BEAT_EVERY, timeout / 4) if timeout else BEAT_EVERY
        self.reload_batch = max(1, reload_batch)
        self.shutdown_delay = shutdown_delay
        self.log = on_log or _default_log
        self.health = Health(self)
        self.slots: list[Slot] = []
        self.members: dict[int, Member] = {}
        self.stopping = False
        self.delaying = False  # SIGTERM came; serving on for shutdown_delay before the drain
        self.exit_code = 0
        self.ever_ready = False
        self.all_ready = False  # the first full set of workers was ready once
        self.restarts_total = 0
        self.reloads = {"ok": 0, "failed": 0}
        self.watchers: list[Any] = []
        self.workers_how = str(workers)  # how the count was found ("2 (cgroup quota 2.0 of 64 CPUs)")
        self.last_error: str | None = None
        self.rolling = Rolling(self)
        self.code: Any = None  # versions.CodeVersions: serve --preload's templates, one per code version
        self.holding = False  # no worker starts yet: the first template is importing the app
        self._done = threading.Event()
        self._sigints = 0

    # -- public: any thread ----------------------------------------------------------------------

    def start(self, wait_for: Callable[[Callable[[bool, str], None]], None] | None = None) -> None:
        """Fork the workers; from the main thread, also take HUP, TERM, INT, TTIN and TTOU. With
        `wait_for`, the workers start once it calls back ok (serve's first template: versions.py)."""
        loop = self.primary.start()
        for event in ("listening", "online", "message", "exit"):
            self.primary.cluster.on(event, getattr(self, f"_on_{event}"))
        self.primary.signals.handle({
            signal.SIGHUP: self.handle_hup, signal.SIGTERM: self.handle_term, signal.SIGINT: self.handle_int,
            signal.SIGTTIN: self.handle_ttin, signal.SIGTTOU: self.handle_ttou,
            signal.SIGUSR1: self.handle_usr1, signal.SIGUSR2: self.handle_usr2,
        })
        loop.run_sync(self._start, wait_for)

    def reload(self) -> None:
        self._post(self.rolling.reload)

    def scale(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_WORKERS:
            raise ValueError(f"cannot scale to {n!r}: need a whole number of workers from 1 to {MAX_WORKERS}")
        self._post(self._scale, n)

    def stop(self, graceful: bool = True) -> None:
        """Drain and stop (after the shutdown delay, as SIGTERM), or with graceful=False at once."""
        self._post(self._stop_after_delay, "stop requested") if graceful else self._post(self._stop, False)

    def status(self) -> dict[str, Any]:
        return self.primary.loop.run_sync(self._status, timeout=5.0)

    def wait(self) -> int:
        """Block until the pool has stopped; the exit code (0 after a graceful stop)."""
        while not self._done.wait(0.5):
            pass
        return self.exit_code

    def finished(self) -> bool:
        return self._done.is_set()

    # -- loop thread: starting workers -----------------------------------------------------------

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        self.primary.loop.call_soon(fn, *args)

    def tell(self, event: str, *args: Any) -> None:
        """Call `on_<event>(*args)` of each watcher that has it; a watcher's failure is reported and
        ends nothing. Events: ready (the first full set of workers is ready), reloading, reloaded
        (ok, why), stopping, restart (member), beat, reopen, scaled (new count, old count), upgrade."""
        for watcher in list(self.watchers):
            method = getattr(watcher, f"on_{event}", None)
            if method is not None:
                try:
                    method(*args)
                except Exception as exc:
                    self.log(f"{type(watcher).__name__}.on_{event} failed: {type(exc).__name__}: {exc}")

    def ready_count(self) -> int:
        return sum(1 for m in self.members.values() if m.state == "ready")

    def readiness(self) -> tuple[bool, str]:
        """Whether to take traffic (a load balancer's view): a worker is ready, no stop has begun."""
        if self.stopping:
            return False, "stopping"
        if self.delaying:
            return False, "shutting down (shutdown delay)"
        if not self.ready_count():
            return False, "no worker is ready" + ("" if self.ever_ready else " yet")
        return True, "ready"

    def _start(self, wait_for: Callable[[Callable[[bool, str], None]], None] | None) -> None:
        self.slots = [Slot(i) for i in range(self.count)]
        self.primary.loop.call_later(self.beat_every, self.health.beat)
        if wait_for is None:
            self._fill_all(True, "")
        else:
            self.holding = True
            wait_for(self._fill_all)

    def _fill_all(self, ok: bool, why: str) -> None:
        self.holding = False
        if not ok:
            self.last_error = why
            return  # whoever waited stops the pool, with its own words
        for slot in self.slots:
            self.fill(slot)

    def fill(self, slot: Slot) -> None:
        """Start the slot's own worker, if it still has none (a timer may come late)."""
        slot.timer = None
        if self.stopping or self.holding or slot.removed or slot.current is not None or \
                slot.incoming is not None:
            return
        member, error = self.fork_for(slot)
        if member is None:
            self._boot_failed(slot, error)
            return
        slot.current = member

    def fork_for(self, slot: Slot) -> tuple[Member | None, str]:
        """A new worker for `slot`, or why it could not be started (this start fails alone)."""
        try:
            worker = self.primary.fork({"PREFORK_SUPERVISED": "1"}, own_group=True)
        except Exception as exc:
            why = f"cannot start a worker: {type(exc).__name__}: {exc}"
            self.log(why)
            self.last_error = why
            return None, why
        member = Member(worker, slot, max_requests=self._request_limit())
        self.members[worker.id] = member
        # by id: a timer holding the member would keep a dead worker (and its buffers) for ready_timeout
        self.primary.loop.call_later(self.ready_timeout, self._ready_timed_out, worker.id)
        return member, ""

    def _request_limit(self) -> int:
        if not self.max_requests:
            return 0
        return self.max_requests + random.randint(0, max(0, self.max_requests_jitter))

    # -- readiness -------------------------------------------------------------------------------

    def _on_online(self, worker: Any) -> None:
        if self.ready_mode == "online":
            self._ready(worker)

    def _on_listening(self, worker: Any, address: Any) -> None:
        member = self.members.get(worker.id)
        if member is not None and self.ready_mode == "listening":
            member.listens += 1
            if member.listens >= self.ready_listens:
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
        if not self.all_ready and not (self.delaying or self.stopping) and self.slots and all(
                s.removed or (s.current is not None and s.current.state == "ready") for s in self.slots):
            self.all_ready = True
            self.tell("ready")

    def _settle(self, member: Member, ok: bool, why: str) -> None:
        waiters, member.waiters = member.waiters, []
        for waiter in waiters:
            waiter(ok, why)

    def _ready_timed_out(self, wid: int) -> None:
        member = self.members.get(wid)
        if member is not None and member.state == "starting":
            why = f"not ready after {self.ready_timeout:g} s"
            self.log(f"worker {member.worker.id} (pid {member.worker.process.pid}) is {why}: stopping it")
            self._settle(member, False, why)
            self.retire(member, why, graceful=False)

    # -- exits and respawn -----------------------------------------------------------------------

    def _on_exit(self, worker: Any, code: int | None, signame: str | None) -> None:
        member = self.members.pop(worker.id, None)
        if member is None:
            return
        how = f"signal {signame}" if signame else f"code {code}"
        fatal = worker.fatal
        if member.state == "starting":
            self._settle(member, False, fatal["error"] if fatal else f"exited with {how}")
        slot = member.slot
        if slot.incoming is member:  # a replacement that failed: the old worker keeps the slot
            slot.incoming = None
        elif slot.current is member:
            slot.current = None
            if not (self.stopping or slot.removed):
                if slot.incoming is not None:  # no third worker: the replacement takes the slot
                    slot.current, slot.incoming = slot.incoming, None
                    self.log(f"worker {worker.id} (pid {worker.process.pid}) died ({how}) while being "
                             f"replaced; worker {slot.current.worker.id} takes its place")
                    slot.restarts += 1
                    self.restarts_total += 1
                    self.tell("restart", member)
                else:
                    self._respawn_later(member, how, fatal)
                self._check_done()
                return
        self.log(f"worker {worker.id} (pid {worker.process.pid}) stopped ({member.why_leaving or how})")
        self._check_done()

    def _respawn_later(self, member: Member, how: str, fatal: dict[str, str] | None) -> None:
        slot, worker = member.slot, member.worker
        early = not member.ready_at or time.monotonic() - member.ready_at < MIN_UPTIME
        slot.restarts += 1
        self.restarts_total += 1
        self.tell("restart", member)
        if fatal is not None:
            if slot.failures < 1 or not early:
                _stdio.write(fatal["traceback"])
            how = f"{how}: {fatal['error']}"
        if not early:
            slot.failures = 0
        self._boot_failed(slot, f"worker {worker.id} (pid {worker.process.pid}) died ({how})", counts=early)

    def _boot_failed(self, slot: Slot, why: str, counts: bool = True) -> None:
        """Start the slot again: at once after a first failure, then backing off 0.1 s, 0.2 s, ...
        up to 10 s. Give up only while no worker was ever ready and boots keep failing."""
        if counts:
            slot.failures += 1
        self.last_error = why
        if counts and not self.ever_ready and slot.failures >= GIVE_UP_AFTER:
            self._give_up(f"workers cannot boot ({slot.failures} attempts); last: {why}")
            return
        delay = 0.0 if slot.failures <= 1 else min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (slot.failures - 2))
        self.log(f"{why}; starting a new one{f' in {delay:g} s' if delay else ''}")
        if slot.timer is None:
            slot.timer = self.primary.loop.call_later(delay, self.fill, slot)

    def _give_up(self, why: str) -> None:
        if self.stopping:
            return
        self.log(f"giving up: {why}")
        self.exit_code = 3
        self._stop(graceful=False)

    # -- draining one worker ---------------------------------------------------------------------

    def retire(self, member: Member, why: str, graceful: bool = True) -> None:
        """Drain a worker (graceful) or kill it; kill it anyway after graceful_timeout."""
        if member.state == "draining":
            return
        was_starting = member.state == "starting"
        member.state = "draining"
        member.why_leaving = why
        worker = member.worker
        if graceful and worker.is_connected():
            worker.disconnect()
            self.primary.loop.call_later(self.graceful_timeout, self._force, worker.id)
        else:
            worker.kill("SIGTERM")
            self.primary.loop.call_later(min(5.0, self.graceful_timeout), self._force, worker.id)
        if was_starting:  # it will never be ready: whoever waits for it (a reload) must hear so now
            self._settle(member, False, why)

    def _force(self, wid: int) -> None:
        member = self.members.get(wid)
        if member is not None and not member.worker.is_dead():
            worker = member.worker
            self.log(f"worker {worker.id} (pid {worker.process.pid}) did not stop in time: SIGKILL")
            member.why_leaving += ", killed after the graceful timeout"
            member.worker.kill("SIGKILL")

    # -- scaling and stopping --------------------------------------------------------------------

    def _scale(self, n: int) -> None:
        if self.stopping or n == len(self.slots):
            return
        old = len(self.slots)
        self.log(f"scaling from {old} to {n} worker(s)")
        for index in range(len(self.slots), n):
            slot = Slot(index)
            self.slots.append(slot)
            self.fill(slot)
        while len(self.slots) > n:
            slot = self.slots.pop()
            slot.removed = True
            if slot.timer is not None:
                slot.timer.cancel()
            for member in (slot.incoming, slot.current):
                if member is not None:
                    self.retire(member, "scaled down")
        self.count = n
        self.tell("scaled", n, old)

    def _stop(self, graceful: bool) -> None:
        if self.stopping and graceful:
            return
        if not self.stopping and not self.delaying:
            self.tell("stopping")
        self.stopping = True
        if self.code is not None:
            self.code.stop()
        if graceful:
            self.primary.servers.stop_accepting()
        for slot in self.slots:
            if slot.timer is not None:
                slot.timer.cancel()
        for member in list(self.members.values()):
            if graceful:
                self.retire(member, "stopping")
            else:
                member.state = "draining"
                member.why_leaving = member.why_leaving or "stopped at once"
                member.worker.kill("SIGKILL")
        self._check_done()

    def _check_done(self) -> None:
        if self.stopping and not self.members:
            self._done.set()

    # -- figures ---------------------------------------------------------------------------------

    def _status(self) -> dict[str, Any]:
        return self.health.status()


def _default_log(line: str) -> None:
    from .logline import stamp

    _stdio.write(f"{stamp()} [prefork] {line}\n")


def supervise(workers: int | None = None, **options: Any) -> Supervisor:
    """Start a supervised pool of `workers` (default: one per core) and return its Supervisor."""
    supervisor = Supervisor(workers or os.cpu_count() or 1, **options)
    supervisor.start()
    return supervisor
