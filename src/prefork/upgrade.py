"""Hot upgrade of the primary (`prefork ctl upgrade [-- ARGS]`, SIGUSR2): a new primary, started with
the current command line or a new one, takes over the sockets; the old one drains and exits.

The old primary (`Upgrader`, on its loop thread) starts the new one with subprocess (never a fork
of this multi-threaded process), in its own session (a Ctrl-C or hang-up meant for the old one must
not reach a primary still on trial), with the listening sockets (every SO_REUSEPORT socket of a
group: closing one would reset what is queued on it), the control and admin sockets and one end of
a socketpair in `pass_fds`, and what each is in PREFORK_UPGRADE (JSON). Until the new one starts
its workers its stderr is a pipe read here, so a bad command line's one-line error reaches this
log and the ctl answer. Once its first full set of workers is ready it writes "ready" on the
socketpair, and the old one hands over: MAINPID= to systemd, its control and admin sockets closed
without removing a file, its workers drained (no shutdown delay), exit 0. If the new one exits, or
is not ready within ready_timeout, it is killed (its workers follow: a worker whose channel closes
exits) and the old one serves on, saying why in its log, in the ctl answer and in `ctl status`.

The new primary adopts what was passed (`passed()`): a listening socket wherever a worker listens on
the same address (binding.py), the control socket for the same path, the admin socket for the same
address; the same Upgrader, as a supervisor watcher, says "ready" (or why it failed).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _stdio, binding
from .upgrade_sockets import ENV, label_binds, passed, previous_pid, take_admin, take_control

__all__ = ["ENV", "Upgrader", "label_binds", "passed", "previous_pid", "take_admin", "take_control"]
MAX_ARGS, MAX_ARG = 200, 4096  # what `ctl upgrade -- ARGS` may carry
KILL_AFTER = 5.0  # a failed new primary gets SIGTERM, then SIGKILL this much later
Done = Callable[[bool, str], None]


def check_args(args: Any) -> str | None:
    """Why a ctl request's `args` is unusable (None: the current command line, or a list of strings)."""
    if args is None:
        return None
    if not isinstance(args, list) or not args:
        return "upgrade: args must be a non-empty list of strings (the prefork command line after 'prefork')"
    if len(args) > MAX_ARGS:
        return f"upgrade: at most {MAX_ARGS} arguments, not {len(args)}"
    for arg in args:
        if not isinstance(arg, str) or len(arg) > MAX_ARG or "\0" in arg:
            return f"upgrade: each argument must be a string of at most {MAX_ARG} characters, without NUL"
    return None


def command_line(args: list[str] | None) -> list[str]:
    """This interpreter with its options, the same entry (a script such as .venv/bin/prefork, or
    -m MODULE), then `args`, or this primary's own arguments."""
    orig, argv = list(getattr(sys, "orig_argv", [])), list(sys.argv)
    n = len(orig) - len(argv) + 1
    if 1 < n <= len(orig) and orig[n:] == argv[1:]:
        return [sys.executable, *orig[1:n], *(argv[1:] if args is None else args)]
    return [sys.executable, "-m", "prefork.cli", *(argv[1:] if args is None else args)]


class Upgrader:
    """The upgrade machinery of one primary; every method but `request` runs on the loop thread."""

    def __init__(self, supervisor: Any, control: Any, log: Callable[[str], None],
                 boot_error: Callable[[], str | None] = lambda: None) -> None:
        self.supervisor, self.control, self.log = supervisor, control, log
        self.boot_error = boot_error
        self.admin: Any = None
        self.outcome: dict[str, Any] | None = None  # the last upgrade's, replaced whole (read by ctl)
        self.proc: subprocess.Popen[bytes] | None = None
        self.waiters: list[Done] = []
        self.handed_over = False
        self._trial: dict[str, Any] = {}  # the running upgrade's sockets, readers and timers
        self.passed = passed()  # we are a new primary: what the old one passed
        self.after_failure: Callable[[], Any] = lambda: None  # once a failed new primary has exited

    # -- any thread ------------------------------------------------------------------------------

    def request(self, args: Any) -> dict[str, Any]:
        """`ctl upgrade`: start one and wait (bounded) for its outcome."""
        problem = check_args(args)
        if problem:
            return {"ok": False, "error": problem}
        box: list[tuple[bool, str]] = []
        done = threading.Event()

        def finished(ok: bool, text: str) -> None:
            box.append((ok, text))
            done.set()

        self.supervisor.primary.loop.call_soon(self.begin, args, "ctl upgrade", finished)
        wait = self.supervisor.ready_timeout + KILL_AFTER + 10
        if not done.wait(wait):
            return {"ok": False, "error": f"no outcome within {wait:g} s; see `prefork ctl status`"}
        ok, text = box[0]
        return {"ok": True, "message": text} if ok else {"ok": False, "error": text}

    def status(self) -> dict[str, Any]:
        return {"upgrade": self.outcome} if self.outcome else {}

    # -- the old primary: starting the new one ---------------------------------------------------

    def on_upgrade(self) -> None:
        self.begin(None, "SIGUSR2", None)

    def begin(self, args: list[str] | None, why: str, done: Done | None) -> None:
        sup = self.supervisor
        refusal = ("the primary is PID 1: its exit would end the container (restart the container "
                   "instead)" if os.getpid() == 1 else
                   "an upgrade is already running" if self.proc is not None or self.handed_over else
                   "the pool is stopping" if sup.stopping or sup.delaying else
                   "this primary is still being started by an upgrade" if self.passed is not None
                   and not self.passed.said else None)
        if refusal:
            self.log(f"{why}: upgrade refused: {refusal}")
            if done is not None:
                done(False, f"upgrade refused: {refusal}")
            return
        if done is not None:
            self.waiters.append(done)
        self._set("running", f"running since {time.strftime('%H:%M:%S')}")
        try:
            self._spawn(args, why)
        except Exception as exc:  # a spawn that fails fails this upgrade only
            reason = f"cannot start the new primary: {type(exc).__name__}: {exc}"
            if self.proc is not None:
                self._fail(reason)
            else:
                self._end_trial()
                self._failed(reason, None)

    def _spawn(self, args: list[str] | None, why: str) -> None:
        ours, theirs = socket.socketpair()
        errors_r, errors_w = os.pipe()
        trial = self._trial = {"hand": ours, "errors": errors_r, "buf": b"", "last": "", "timers": []}
        stderr = -1
        try:
            stderr = os.dup(2)  # where the new one writes once it starts its workers
            fds, spec = self._sockets()
            spec.update({"v": 1, "pid": os.getpid(), "ready": theirs.fileno(), "stderr": stderr,
                         "pipe": os.fstat(errors_w).st_ino})
            env = {k: v for k, v in os.environ.items() if k not in ("PREFORK_SERVE", "PREFORK_HOOKS")}
            env[ENV] = json.dumps(spec)
            env.update(self._systemd_env())
            argv = command_line(args)
            self.proc = subprocess.Popen(argv, env=env, pass_fds=(*fds, theirs.fileno(), stderr),
                                         stdin=subprocess.DEVNULL, stderr=errors_w, start_new_session=True)
        finally:
            theirs.close()
            os.close(errors_w)
            if stderr >= 0:
                os.close(stderr)
        self.log(f"{why}: upgrading: new primary pid {self.proc.pid}: {' '.join(argv[1:])[:300]}")
        loop = self.supervisor.primary.loop
        ours.setblocking(False)
        os.set_blocking(errors_r, False)
        loop.add_reader(ours.fileno(), self._on_hand)
        loop.add_reader(errors_r, self._on_errors)
        try:
            trial["pidfd"] = os.pidfd_open(self.proc.pid)
            loop.add_reader(trial["pidfd"], self._on_exit)
        except (AttributeError, OSError):
            trial["timers"].append(loop.call_later(0.1, self._poll_exit))
        timeout = self.supervisor.ready_timeout
        trial["timers"].append(loop.call_later(timeout, self._fail, f"the new primary was not ready "
                                                                    f"within {timeout:g} s"))

    def _sockets(self) -> tuple[list[int], dict[str, Any]]:
        """What to pass: every listening socket of the pool, the control and the admin socket. A
        socket this primary inherited (systemd's, fd://N) goes by its own number, so that the same
        fd://N in the new command line still names it."""
        from .activation import ACTIVATED

        inherited = dict(binding._adopted)
        listeners = []
        for handle in list(self.supervisor.primary.servers.by_id.values()):
            if handle.closed or handle.stopped or binding._key(handle.family, handle.addr) in inherited:
                continue
            handle.passed_on = True  # kept after a failed upgrade: its workers may hold them a while
            slots = list(getattr(handle, "slots", {}).values())
            addr = handle.addr if isinstance(handle.addr, str) else list(handle.addr)
            if slots and handle.sockname is not None and not isinstance(addr, str):
                addr = [addr[0], handle.sockname[1]]  # every slot is bound on the port the first got
            for sock in slots or [getattr(handle, "sock", None)]:
                if sock is not None and sock.fileno() >= 0:
                    listeners.append({"fd": sock.fileno(), "addr": addr, "slot": bool(slots)})
        for (family, *where), sock in inherited.items():
            if sock.fileno() >= 0:
                addr = where[0] if family == socket.AF_UNIX else list(where)
                listeners.append({"fd": sock.fileno(), "addr": addr, "slot": False,
                                  "activated": sock.fileno() in ACTIVATED,
                                  "name": ACTIVATED.get(sock.fileno())})
        fds = [item["fd"] for item in listeners]
        spec: dict[str, Any] = {"listeners": listeners, "control": None, "admin": None}
        control_sock = getattr(self.control, "sock", None)
        if control_sock is not None:
            fds.append(control_sock.fileno())
            spec["control"] = {"fd": control_sock.fileno(), "path": self.control.path}
        if self.admin is not None and self.admin.sock.fileno() >= 0:
            fds.append(self.admin.sock.fileno())
            spec["admin"] = self.admin.sock.fileno()
        return fds, spec

    def _systemd_env(self) -> dict[str, str]:
        """NOTIFY_SOCKET (and the watchdog), which sdnotify.py took out of our environment."""
        notifier = self._notifier()
        if notifier is None:
            return {}
        env = {"NOTIFY_SOCKET": notifier.address}
        if notifier.watchdog_s:
            env["WATCHDOG_USEC"] = str(int(notifier.watchdog_s * 1e6))
        return env

    def _notifier(self) -> Any:
        from .sdnotify import Notifier

        return next((w for w in self.supervisor.watchers if isinstance(w, Notifier)), None)

    # -- the old primary: what the new one says --------------------------------------------------

    def _on_errors(self) -> None:
        """The new primary's stderr until it starts its workers: copied to ours, last line kept."""
        trial = self._trial
        try:
            data = os.read(trial["errors"], 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_errors()
            return
        _stdio.write(data.decode("utf-8", "replace"))
        lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
        if lines:
            trial["last"] = lines[-1][:300]

    def _close_errors(self) -> None:
        fd = self._trial.pop("errors", None)
        if fd is not None:
            self.supervisor.primary.loop.remove_reader(fd)
            os.close(fd)

    def _on_hand(self) -> None:
        trial = self._trial
        try:
            data = trial["hand"].recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        trial["buf"] += data
        if b"\n" not in trial["buf"]:
            if not data or len(trial["buf"]) > 65536:  # the new one closed it (or talks nonsense)
                self.supervisor.primary.loop.remove_reader(trial["hand"].fileno())
            return
        line = trial["buf"].split(b"\n", 1)[0].decode("utf-8", "replace")
        word, _, rest = line.partition(" ")
        if word == "ready":
            try:
                info = json.loads(rest)
            except ValueError:
                info = None
            self._hand_over(info if isinstance(info, dict) else {})
        else:
            self._fail(f"the new primary failed: {' '.join(rest.split())[:300] or 'no reason given'}")

    def _poll_exit(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._trial.setdefault("timers", []).append(
                self.supervisor.primary.loop.call_later(0.1, self._poll_exit))
            return
        self._on_exit()

    def _on_exit(self) -> None:
        proc, trial = self.proc, self._trial
        if proc is None or proc.poll() is None:
            return
        if trial.get("errors") is not None:  # its last words first
            for _ in range(64):
                if trial.get("errors") is None:
                    break
                self._on_errors()
        code = proc.returncode
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
        last = trial.get("last")
        self._fail(f"the new primary exited with {how}" + (f": {last}" if last else ""))

    # -- the old primary: outcomes ---------------------------------------------------------------

    def _fail(self, why: str) -> None:
        if self.proc is None or self.handed_over:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            self._kill(proc, signal.SIGTERM)
            self.supervisor.primary.loop.call_later(KILL_AFTER, self._kill, proc, signal.SIGKILL)
        self._end_trial()
        self._reap(proc)
        self._failed(why, proc.pid)

    def _failed(self, why: str, pid: int | None) -> None:
        self.log(f"upgrade failed, still serving: {why}")
        self._set("failed", why, pid)
        self._answer(False, f"upgrade failed, still serving: {why}")

    def _kill(self, proc: subprocess.Popen[bytes], signum: int) -> None:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signum)  # by pid; its workers exit when their channel closes
            except ProcessLookupError:
                pass

    def _end_trial(self) -> None:
        trial, self._trial = self._trial, {}
        loop = self.supervisor.primary.loop
        for timer in trial.get("timers", []):
            timer.cancel()
        hand = trial.get("hand")
        if hand is not None:
            loop.remove_reader(hand.fileno())
            hand.close()
        pidfd = trial.get("pidfd")
        if pidfd is not None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        fd = trial.get("errors")
        if fd is not None:
            loop.remove_reader(fd)
            os.close(fd)

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        """A failed new primary: wait for it (no zombie), then let the pid file be ours again."""
        if proc.poll() is None:
            self.supervisor.primary.loop.call_later(0.1, self._reap, proc)
            return
        try:
            self.after_failure()
        except Exception as exc:  # reported; it fails nothing else
            self.log(f"after a failed upgrade: {type(exc).__name__}: {exc}")

    def _hand_over(self, info: dict[str, Any]) -> None:
        proc = self.proc
        assert proc is not None
        self.handed_over = True
        self._end_trial()
        self.log(f"upgraded: new primary pid {proc.pid} is ready; draining the old workers and exiting")
        notifier = self._notifier()
        if notifier is not None:  # the new one is the service now; our STOPPING=1 must not be heard
            notifier.send(f"MAINPID={proc.pid}", f"STATUS=upgraded: new primary pid {proc.pid}")
            self.supervisor.watchers.remove(notifier)
        if info.get("control") and self.control is not None:
            self.control.hand_over()  # stop answering here, leave the file: the new one serves it
        if info.get("admin") and self.admin is not None:
            self.admin.hand_over()  # before _stop below: what it accepted is answered as ready
        self._set("ok", f"new primary pid {proc.pid}", proc.pid)
        self._answer(True, f"upgraded: new primary pid {proc.pid}")
        if sys.stdin is not None and _isatty(sys.stdin):
            self.log(f"the new primary (pid {proc.pid}) runs in its own session: Ctrl-C here no longer "
                     "reaches it; stop it with `prefork ctl stop` or SIGTERM")
        self.supervisor._stop(True)

    def _set(self, state: str, message: str, pid: int | None = None) -> None:
        self.outcome = {"state": state, "message": message, "pid": pid, "at": round(time.time(), 3)}

    def _answer(self, ok: bool, text: str) -> None:
        waiters, self.waiters = self.waiters, []
        for done in waiters:
            done(ok, text)

    def on_stopping(self) -> None:
        if self.proc is not None and not self.handed_over:
            self._fail("the old primary is stopping")
        elif self.passed is not None and not self.passed.said:
            self.passed.say("failed " + (self.boot_error() or self.supervisor.last_error
                                         or "it stopped before its workers were ready"))

    # -- the new primary -------------------------------------------------------------------------

    def attach(self, admin: Any) -> None:
        """The admin server is known; a new primary's stderr goes where the old one's goes."""
        self.admin = admin
        if self.passed is not None:
            if admin is not None:
                admin.held = self.passed.admin_taken
            self.passed.switch_stderr()

    def on_ready(self) -> None:
        """A new primary's first full set of workers is ready: say so, and serve control and admin."""
        if self.passed is not None and not self.passed.said:
            self.passed.say("ready " + json.dumps({"pid": os.getpid(), "control": self.passed.control_taken,
                                                   "admin": self.passed.admin_taken}))
            self.control.take_over()
            if self.admin is not None:
                self.admin.serve_now()
            from .binding import close_unclaimed

            dropped = close_unclaimed()
            if dropped:
                self.log(f"upgrade: no longer serving {', '.join(dropped)} (not in the new command line)")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (ValueError, OSError):
        return False
