"""The primary's side: forking workers, their channels and exits, and the cluster's events.

All state lives in one `Primary` object and is touched only on its loop thread (see loop.py);
public calls from other threads are handed to the loop with `run_sync`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import weakref
from collections.abc import Callable
from typing import Any

from . import _proc, _stdio, binding
from .channel import Channel
from .events import EventEmitter
from .inbox import Inbox
from .loop import Loop
from .settings import Settings
from .worker import Worker

ENV_ID, ENV_FD, ENV_PPID = "PREFORK_WORKER_ID", "PREFORK_CHANNEL_FD", "PREFORK_PRIMARY_PID"
ENV_POLICY, ENV_SERIALIZATION = "PREFORK_SCHED_POLICY", "PREFORK_SERIALIZATION"
# What systemd tells the primary alone: sockets passed to its pid, where to notify it, its watchdog.
# A worker that saw them could take the sockets or notify in its name (activation.py, sdnotify.py).
MANAGER_VARS = frozenset({"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                          "WATCHDOG_PID"})


class Primary(Inbox):
    """Owns the workers, the loop, the settings and the shared server handles of the primary."""

    def __init__(self, cluster: EventEmitter, policy: Callable[[], str]) -> None:
        self.cluster = cluster
        self.policy = policy
        self.workers: dict[int, Worker] = {}
        self.settings = Settings()
        self.loop: Loop | None = None
        self._next_id = 1
        self._main_done = False
        self._fatal = False
        self._pidfd_ok = hasattr(os, "pidfd_open")
        self._poll_timer: Any = None
        self._lock = threading.Lock()
        self._fds_at_start: set[int] = set()
        self.servers: Any = None  # handles.Servers, created with the loop
        self.signals: Any = None  # signals.Signals, created with the loop
        self.template: Any = None  # template.Template: forks the workers of start="fork"
        self.versions: Any = None  # versions.CodeVersions: serve --preload's templates (else spawn)
        self.internal: dict[str, Callable[[Worker, Any, list[int]], None]] = {
            "online": self._on_online,
            "listening": self._on_listening,
            "leaving": self._on_leaving,
            "fatal": self._on_fatal,
            "P": self._on_pong,
        }

    # -- public entry points (any thread) --------------------------------------------------------

    def setup(self, opts: dict[str, Any]) -> None:
        self.settings.update(opts)
        if opts.get("start") == "fork":
            self._fds_at_start = _open_fds()  # the preloaded app's: forked workers keep these only
            self._start_template()
        self.cluster.emit("setup", self.settings)

    def _start_template(self) -> None:
        """Fork the single-threaded template that forks the workers (template.py), while this
        process still has one thread; a template for an earlier target goes."""
        from . import template

        if self.template is not None:
            self.template.close()
        self.template = None
        if self.loop is None:
            self.template = template.start(self.settings["target"], self._fds_at_start)

    def fork(self, env: dict[str, str] | None = None, own_group: bool = False) -> Worker:
        """`own_group`: start the worker in its own session, so terminal signals (Ctrl-C, hang-up)
        reach only the primary, which then drains it (the supervisor's way)."""
        loop = self.start()
        return loop.run_sync(self._fork, dict(env or {}), own_group)

    def disconnect(self, callback: Callable[[], Any] | None = None) -> None:
        if self.loop is None:
            if callback is not None:
                callback()
            return
        self.loop.run_sync(self._disconnect_all, callback)  # the workers of now, not later forks

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a callback on the loop thread, one at a time with all others."""
        self.start().call_soon(fn, *args)

    def start(self) -> Loop:
        """Start the loop thread once; it keeps the process alive while there are workers."""
        with self._lock:
            if self.loop is None:
                from .handles import Servers

                self._fds_at_start = self._fds_at_start or _open_fds()  # a forked worker keeps these
                from .signals import Signals

                self.loop = Loop(self._exit_request)
                self.servers = Servers(self)
                self.signals = Signals(self.loop)
                thread = threading.Thread(target=self._run, name="prefork-primary", daemon=False)
                self.loop.thread = thread
                _proc.on_main_end(self._main_finished, self._main_raised)
                if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                    # Ctrl-C ends the cluster quietly, as Node's does, unless the user handles it
                    self.signals.handle({signal.SIGINT: self.handle_int})
                thread.start()
            return self.loop

    # -- forking ---------------------------------------------------------------------------------

    def _fork(self, env: dict[str, str], own_group: bool = False) -> Worker:
        if not self.settings:
            self.setup({})
        settings = self.settings
        forking = settings["start"] == "fork"
        if not forking and not settings.get("module") and not settings.get("exec"):
            raise RuntimeError("fork(): the primary has no script to run; setup_primary(exec=...)")
        wid = self._next_id
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if forking:
                proc = self._fork_copy(self._child_env(wid, theirs.fileno(), env), theirs.fileno(),
                                       own_group)
            else:
                proc = self._from_template(wid, theirs.fileno(), env, own_group) \
                    or self._spawn(wid, theirs.fileno(), env, own_group)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._next_id += 1
        worker = Worker(wid, proc, Channel(ours, settings["serialization"]), self)
        self.workers[wid] = worker
        self._watch(worker)
        self.cluster.emit("fork", worker)
        return worker

    def _fork_copy(self, env: dict[str, str], fd: int, own_group: bool) -> Any:
        """A worker forked by the template, or from this thread when there is none (forkstart.py)."""
        template = self.template
        if template is not None and template.alive:
            try:
                return template.fork(env, fd, own_group)
            except OSError as exc:
                _stdio.write(f"prefork: {exc}; forking workers from the primary from now on\n")
        from .forkstart import fork_worker

        return fork_worker(env, fd, own_group, self.settings["target"], self._fds_at_start)

    def _from_template(self, wid: int, fd: int, env: dict[str, str], own_group: bool) -> Any:
        """serve --preload: a worker forked by the current code version's template (versions.py);
        None when there is none, and the worker starts as a fresh interpreter."""
        if self.versions is None:
            return None
        return self.versions.fork(self._child_env(wid, fd, env), fd, own_group)

    def _child_env(self, wid: int, fd: int, env: dict[str, str]) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if k not in MANAGER_VARS}
        child_env = {**inherited, **env}
        child_env.update({
            ENV_ID: str(wid), ENV_FD: str(fd), ENV_PPID: str(os.getpid()),
            ENV_POLICY: self.policy(), ENV_SERIALIZATION: self.settings["serialization"],
            "PREFORK_MAX_MESSAGE": str(self.settings["max_message_size"]),  # the worker's channel limit
        })
        return child_env

    def _spawn(self, wid: int, fd: int, env: dict[str, str], own_group: bool) -> subprocess.Popen[bytes]:
        settings = self.settings
        child_env = self._child_env(wid, fd, env)
        pipe = subprocess.PIPE if settings["silent"] else None
        launch = getattr(self, "launch", None)  # --user/--group/--umask (launch.py)
        return subprocess.Popen(settings.argv(), env=child_env, cwd=settings["cwd"], pass_fds=(fd,),
                                stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe,
                                start_new_session=own_group, **(launch.popen_kwargs() if launch else {}))

    def _watch(self, worker: Worker) -> None:
        loop = self.loop
        assert loop is not None and worker._channel is not None
        channel = worker._channel
        # a weak reference: worker -> channel -> this callback -> worker would be a cycle, and a dead
        # worker (its 128 KiB receive buffer, its Popen) would wait for a full GC, which may be minutes
        ref = weakref.ref(worker)

        def backlog() -> None:
            alive = ref()
            if alive is not None:
                loop.call_soon(self._flush_soon, alive)

        channel.on_backlog = backlog
        channel.spin.peer = worker.process.pid  # its placement decides whether the reader polls (spin.py)
        loop.add_reader(channel.fileno(), lambda: self._on_readable(worker))
        if self._pidfd_ok:
            try:
                pidfd = os.pidfd_open(worker.process.pid)
            except OSError:
                self._pidfd_ok = False
            else:
                worker._pidfd = pidfd
                loop.add_reader(pidfd, lambda: self._on_process_exit(worker))
                return
        self._start_polling()

    def _start_polling(self) -> None:
        """Fallback where pidfd_open is refused: look for exited workers every 50 ms."""
        if self._poll_timer is None:
            self._poll_timer = self.loop.call_later(0.05, self._poll_exits)  # type: ignore[union-attr]

    def _poll_exits(self) -> None:
        self._poll_timer = None
        for worker in list(self.workers.values()):
            if worker.state != "dead" and worker.process.poll() is not None:
                self._on_process_exit(worker)
        if any(w.state != "dead" for w in self.workers.values()):
            self._start_polling()

    # -- exits -----------------------------------------------------------------------------------

    def _on_process_exit(self, worker: Worker) -> None:
        pidfd = worker._pidfd
        if pidfd is not None:
            self.loop.remove_reader(pidfd)
            os.close(pidfd)
            worker._pidfd = None
        if worker.process.poll() is None:  # pidfd readable means exited; wait for the status
            worker.process.wait()
        self._drain_channel(worker)
        returncode = worker.process.returncode
        code, signame = (None, _proc.signal_name(-returncode)) if returncode < 0 else (returncode, None)
        worker.state = "dead"
        if worker.exited_after_disconnect is None:
            worker.exited_after_disconnect = False
        if worker._disconnect_emitted:
            self.workers.pop(worker.id, None)
        worker.emit("exit", code, signame)
        self.cluster.emit("exit", worker, code, signame)
        self._maybe_stop()

    def _drain_channel(self, worker: Worker) -> None:
        """Deliver the dead worker's last messages, so `disconnect` comes before `exit`."""
        channel = worker._channel
        while channel is not None and not worker._disconnect_emitted:
            try:
                before = channel.bytes_read
                self._on_readable(worker)
                if not worker._disconnect_emitted and channel.bytes_read == before:
                    self._channel_closed(worker)  # nothing more to read: a grandchild holds the fd
            except OSError:
                self._channel_closed(worker)

    # -- graceful disconnect ---------------------------------------------------------------------

    def kill_worker(self, worker: Worker, signum: int) -> None:
        if worker.process.returncode is None:
            try:
                worker.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def disconnect_worker(self, worker: Worker) -> None:
        self.post(self._disconnect_one, worker)

    def _disconnect_one(self, worker: Worker) -> None:
        worker.exited_after_disconnect = True
        if worker._channel is None or worker._channel.closed:
            return
        self.servers.worker_leaving(worker)
        worker._channel.send_internal({"t": "disconnect"})

    def _disconnect_all(self, callback: Callable[[], Any] | None) -> None:
        self.servers.stop_accepting()
        pending = [w for w in self.workers.values()]
        for worker in pending:
            self._disconnect_one(worker)
        if callback is None:
            return

        def check(*_: Any) -> None:
            if not all(w.is_dead() and w._disconnect_emitted for w in pending):
                return
            self.servers.close_unused()
            if not self.servers.any_open():
                self.cluster.off("exit", check)
                self.cluster.off("disconnect", check)
                callback()  # type: ignore[misc]

        self.cluster.on("exit", check)
        self.cluster.on("disconnect", check)
        self.loop.call_soon(check)

    def listener_added(self, worker: Worker, event: str) -> None:
        """Messages are not held in the primary (as in Node)."""

    # -- the end of the primary ------------------------------------------------------------------

    def _run(self) -> None:
        """The loop thread. If the loop ends for any reason but a finished cluster, the primary
        must not live on deaf (serving nothing, answering no signal): its workers are killed and
        the process exits non-zero at once, so that an outside supervisor restarts it."""
        try:
            self.loop.run_forever()
        except BaseException:
            self._loop_died()
        finally:
            self.servers.close_all()

    def _loop_died(self) -> None:
        import traceback

        _stdio.write("prefork: the primary's loop failed; stopping every worker\n" + traceback.format_exc())
        for worker in list(self.workers.values()):
            try:
                worker.process.send_signal(signal.SIGKILL)
            except OSError:
                pass
        _proc.exit_now(70)  # EX_SOFTWARE

    def _main_finished(self) -> None:
        """The main thread's script has ended (its exit hook): stop once no worker is left."""
        self.loop.call_soon(self._set_main_done)

    def _main_raised(self, *exc_info: Any) -> bool:
        self._fatal = True
        return False

    def _set_main_done(self) -> None:
        self._main_done = True
        if self._fatal:
            self._stop_workers(signal.SIGTERM)
        self._maybe_stop()

    def _maybe_stop(self) -> None:
        if self._main_done and not self.workers:
            if self._user_threads_alive():
                # A user's thread (a threading.Timer: Node's pending setTimeout) may still fork:
                # the loop must outlive it, or its fork() would start a worker nobody watches.
                if not getattr(self, "_stop_polling", False):
                    self._stop_polling = True
                    self.loop.call_later(0.05, self._recheck_stop)
                return
            self.loop.stopping = True

    def _recheck_stop(self) -> None:
        self._stop_polling = False
        self._maybe_stop()

    def _user_threads_alive(self) -> bool:
        main, ours = threading.main_thread(), self.loop.thread if self.loop else None
        return any(t.is_alive() and not t.daemon and t is not main and t is not ours
                   for t in threading.enumerate())

    def _stop_workers(self, signum: int) -> None:
        for worker in list(self.workers.values()):
            self.kill_worker(worker, signum)
        self.loop.call_later(2.0, self._stop_workers, signal.SIGKILL)

    def _exit_request(self, code: int) -> None:
        """`sys.exit()` in a callback: end the primary with that code, its workers with it."""
        try:
            for worker in list(self.workers.values()):
                if worker._channel is not None:
                    worker._channel.close()
                self.kill_worker(worker, signal.SIGTERM)
            for worker in list(self.workers.values()):
                try:
                    worker.process.wait(1.0)
                except subprocess.TimeoutExpired:
                    worker.process.kill()
                    worker.process.wait()
        finally:
            _proc.exit_now(code)

    def handle_int(self) -> None:
        """Ctrl-C in a library primary (no supervisor): end the cluster quietly, as Node's does."""
        self._fatal = True
        self._exit_request(128 + signal.SIGINT)


def _open_fds() -> set[int]:
    """What a forked worker keeps; not the listening sockets the primary inherited (binding.py):
    those reach a worker only through its listen(), as any shared socket does."""
    try:
        fds = {int(name) for name in os.listdir("/proc/self/fd")}
    except OSError:
        fds = {0, 1, 2}
    return fds - binding.adopted_fds()
