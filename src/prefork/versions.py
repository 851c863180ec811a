"""Code versions for `serve --preload`: one template process per version of the app's code.

A template (template_boot.py) is a fresh interpreter that imports the app once; workers are forked
from it (template.py), so they start in milliseconds and share its pages, and the primary itself
never imports the app. A reload first starts a template for the code now on disk:
- if its import fails, the reload fails: the old template and the old workers keep serving, and the
  error is printed once;
- otherwise it becomes current, the rolling reload forks the new workers from it, and the old
  template retires: it forks nothing more and exits when its last worker has gone. A reload that
  fails later (a new worker never ready) goes back to the old template for respawns.
If the current template dies, workers are started as fresh interpreters (the primary's spawn path)
while a new template starts, after a pause that grows with repeated deaths.

All of it runs on the primary's loop thread, and none of it blocks: the first template imports the
app while the control socket and the admin endpoint already answer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from . import _stdio
from .template import Forked, Template
from .template_boot import ENV_ENTRY, ENV_FD, ENV_PARENT, ENV_SPARE

MAX_ANSWER = 1 << 20
RESTART_MIN, RESTART_MAX = 0.5, 30.0  # pause before replacing a template that died
SPARE_AFTER = 1.0  # seconds after an import before the next spare starts: never beside a reload's work


class TemplateFailed(Exception):
    """A template could not import the app: `str()` is one line, `.traceback` the details."""

    def __init__(self, line: str, details: str = "") -> None:
        super().__init__(line)
        self.traceback = details


class Version:
    """One template process and what the primary knows of it."""

    def __init__(self, number: int, popen: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.number = number
        self.popen = popen
        self.template = Template(popen.pid, sock)
        self.started = time.monotonic()
        self.state = "importing"  # importing, current, previous, retired, failed
        self.info: dict[str, Any] = {}
        self.timer: Any = None
        self.settle: Callable[[dict[str, Any]], None] | None = None  # while importing
        # the loop watches a copy of the socket's descriptor: any path may close the socket itself
        # (Template._gone, on its end), and a closed fd must never stay in the loop's selector
        self.watch_fd = os.dup(sock.fileno())

    def unwatched(self) -> None:
        if self.watch_fd >= 0:
            os.close(self.watch_fd)
            self.watch_fd = -1

    def describe(self) -> dict[str, Any]:
        return {"version": self.number, "pid": self.popen.pid, "state": self.state,
                "alive": self.template.alive}


class CodeVersions:
    """The templates of one primary (see the module docstring)."""

    def __init__(self, primary: Any, entry: str, cwd: str | None, log: Callable[[str], None],
                 import_timeout: float = 30.0, label: str = "the app", spare: bool = True) -> None:
        self.primary = primary
        self.entry = entry
        self.label = label
        self.cwd = cwd
        self.log = log
        self.import_timeout = import_timeout
        self.current: Version | None = None
        self.previous: Version | None = None  # the one a reload in progress may go back to
        self.others: list[Version] = []  # retired or importing, until their process has ended
        self.count = 0
        self._deaths = 0
        self._restart_timer: Any = None
        self.stopping = False
        self.disabled: str | None = None  # why workers start as fresh interpreters for good
        self.importing: Version | None = None  # one import at a time: `previous` belongs to it
        # a spare: a template that has imported the serving machinery but not the app yet, so that a
        # reload imports the app alone (a fresh interpreter with uvicorn takes ~0.1 s more)
        self.spare: Version | None = None
        self.use_spare = spare
        self._spare_timer: Any = None

    # -- starting a template ---------------------------------------------------------------------

    def _spawn(self, spare: bool = False) -> Version:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {k: v for k, v in os.environ.items() if k not in _manager_vars()}
        env.update({ENV_FD: str(theirs.fileno()), ENV_ENTRY: self.entry, ENV_PARENT: str(os.getpid())})
        if spare:
            env[ENV_SPARE] = "1"
        launch = getattr(self.primary, "launch", None)
        extra = launch.popen_kwargs() if launch is not None else {}
        try:
            popen = subprocess.Popen([sys.executable, "-m", "prefork.template_boot"], env=env, cwd=self.cwd,
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                     start_new_session=True, **extra)  # Ctrl-C is the primary's alone
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if spare:
            return Version(0, popen, ours)  # numbered once it imports a version
        self.count += 1
        return Version(self.count, popen, ours)

    def _unsafe(self, version: Version, info: dict[str, Any]) -> bool:
        """An app that starts threads at import cannot be forked safely (a worker may inherit a lock
        another thread held, and hang): use fresh interpreters from now on, and say so once."""
        threads = info.get("threads")
        if not threads:
            return False
        self.disabled = f"the app starts threads at import ({', '.join(map(str, threads))[:200]})"
        self.log(f"{self.disabled}: forking from it is unsafe, so workers start as fresh interpreters "
                 "(--no-preload says the same without this check)")
        self._end(version)
        self.current = None
        return True

    def prepare(self, done: Callable[[bool, str], None], quiet: bool = False) -> None:
        """Start a template for the code on disk now (at start, and for each reload); `done(ok, why)`
        once it has imported the app and is current, or failed (its traceback is printed then,
        unless `quiet`: the first one's failure ends the command with one line). Never blocks the
        loop: control, admin and status answer meanwhile."""
        if self.disabled:
            done(True, "")  # the workers load the code themselves
            return
        if self.importing is not None:
            done(False, "a template is importing the app already (a dead one's replacement): try again")
            return
        try:
            version = self._take_spare() or self._spawn()
        except OSError as exc:
            done(False, f"cannot start a template: {exc}")
            return
        self.others.append(version)
        loop = self.primary.loop
        fd = version.watch_fd

        def settle(answer: dict[str, Any]) -> None:
            if version.settle is None:
                return  # settled already (stopped meanwhile)
            version.settle = None
            self.importing = None
            if version.timer is not None:
                version.timer.cancel()
                version.timer = None
            loop.remove_reader(fd)
            if "ready" in answer and not self.stopping:
                self.others.remove(version)
                self.previous = self.current
                if not self._unsafe(version, answer["ready"]):
                    self._became_current(version, answer["ready"])
                self._spare_later()
                done(True, "")
                return
            why = "stopping" if self.stopping else \
                str(answer.get("error", "the template ended before it imported the app"))
            version.state = "failed"
            self._end(version)
            if answer.get("traceback") and not quiet:
                _stdio.write(answer["traceback"])  # once: the file and line of what broke
            self._spare_later()
            done(False, why)

        version.settle = settle
        self.importing = version
        loop.add_reader(fd, lambda: _read_answer(version, settle))
        version.timer = loop.call_later(self.import_timeout, settle,
                                        {"error": f"the app's import took over {self.import_timeout:g} s"})

    # -- the spare ---------------------------------------------------------------------------------

    def _spare_later(self) -> None:
        if self.use_spare and not (self.stopping or self.disabled or self.spare or self._spare_timer):
            self._spare_timer = self.primary.loop.call_later(SPARE_AFTER, self._start_spare)

    def _start_spare(self) -> None:
        self._spare_timer = None
        if self.stopping or self.disabled or self.spare is not None:
            return
        try:
            version = self._spawn(spare=True)
        except OSError as exc:
            self.log(f"cannot start a spare template: {exc}")
            return
        version.state = "starting"
        self.spare = version
        self.primary.loop.add_reader(version.watch_fd, lambda: self._spare_said(version))

    def _spare_said(self, version: Version) -> None:
        """Its one message ("machinery imported"); anything after that is its end."""
        answer = version.template.message_now()
        if answer is None and version.template.alive:
            return
        if version.state == "starting" and answer is not None and answer.get("spare") is True:
            version.state = "spare"
            return
        self._drop_spare(version)

    def _drop_spare(self, version: Version) -> None:
        self.primary.loop.remove_reader(version.watch_fd)
        if self.spare is version:
            self.spare = None
        self._end(version)

    def _take_spare(self) -> Version | None:
        """The spare, told to import the app now; None when there is none. One still importing the
        machinery is taken too (its "go" waits in the socket): it is further on than a new one."""
        spare = self.spare
        if spare is None:
            return None
        if spare.state not in ("spare", "starting") or not spare.template.alive:
            self._drop_spare(spare)
            return None
        self.primary.loop.remove_reader(spare.watch_fd)
        self.spare = None
        try:
            spare.template.sock.send(json.dumps({"go": {"cwd": self.cwd}}).encode())
        except OSError:
            self._end(spare)
            return None
        self.count += 1
        spare.number, spare.state, spare.started = self.count, "importing", time.monotonic()
        return spare

    # -- the end of a reload -----------------------------------------------------------------------

    def finished(self, ok: bool) -> None:
        """The reload that called `prepare` is over: retire the old template, or (it failed) go
        back to it for respawns and retire the new one."""
        old, self.previous = self.previous, None
        if old is None:
            return
        if not ok and old.template.alive and self.current is not None:
            new, self.current = self.current, old
            old.state = "current"
            self.log(f"reload failed: respawns fork from template v{old.number} again")
            self._retire(new)
        else:
            self._retire(old)

    def _became_current(self, version: Version, info: dict[str, Any]) -> None:
        if info.get("connections"):
            self.log(f"the app opened {len(info['connections'])} connection(s) at import "
                     f"({', '.join(map(str, info['connections']))}), which every forked worker shares: "
                     "reopen them in a post_fork hook (--hooks), or serve with --no-preload")
        version.info = info
        version.state = "current"
        self.current = version
        interface = f" ({info['interface']})" if info.get("interface") else ""
        self.log(f"template v{version.number} (pid {version.popen.pid}) imported {self.label}{interface} in "
                 f"{time.monotonic() - version.started:.2f} s")
        self._watch(version)

    # -- forking, retiring, deaths ---------------------------------------------------------------

    def fork(self, env: dict[str, str], fd: int, own_group: bool) -> Forked | None:
        """A worker forked by the current template; None when there is none (the caller spawns)."""
        version = self.current
        if version is None or not version.template.alive:
            return None
        try:
            return version.template.fork(env, fd, own_group)
        except OSError as exc:
            self.log(f"template v{version.number}: {exc}; starting this worker as a fresh interpreter")
            return None

    def _watch(self, version: Version) -> None:
        fd = version.watch_fd
        self.primary.loop.add_reader(fd, lambda: self._pump(version, fd))

    def _pump(self, version: Version, fd: int) -> None:
        version.template.pump()
        if version.template.alive:
            return
        self.primary.loop.remove_reader(fd)
        version.unwatched()
        version.popen.returncode = version.popen.returncode or 0  # reaped by Template._gone
        if version in self.others:
            self.others.remove(version)
        if version is self.current and not self.stopping:
            self.current = None
            self._deaths += 1
            delay = min(RESTART_MAX, RESTART_MIN * 2 ** (self._deaths - 1))
            self.log(f"template v{version.number} (pid {version.popen.pid}) died; workers start as "
                     f"fresh interpreters until a new template is ready (in {delay:g} s)")
            self._restart_timer = self.primary.loop.call_later(delay, self._replace_dead)

    def _replace_dead(self) -> None:
        self._restart_timer = None
        if self.stopping or self.current is not None:
            return
        if self.importing is not None or self.previous is not None:  # a reload's: let it finish
            self._restart_timer = self.primary.loop.call_later(RESTART_MIN, self._replace_dead)
            return

        def done(ok: bool, why: str) -> None:
            self.previous = None  # nothing to go back to: the dead one is gone
            if ok:
                self._deaths = 0
            elif not self.stopping:
                self.log(f"could not start a new template: {why}")
                self._restart_timer = self.primary.loop.call_later(RESTART_MAX, self._replace_dead)

        self.prepare(done)

    def _retire(self, version: Version) -> None:
        version.state = "retired"
        if not version.template.alive:
            return  # gone already: nothing to wait for
        if version not in self.others:
            self.others.append(version)
        version.template.retire()

    def _end(self, version: Version) -> None:
        """Stop a template that never served (its import failed or took too long)."""
        try:
            version.popen.kill()
        except OSError:
            pass
        version.template.close()  # waits for it: no zombie
        version.unwatched()
        version.popen.returncode = version.popen.returncode or 1
        if version in self.others:
            self.others.remove(version)

    def stop(self) -> None:
        """The pool stops: no new template; each one exits with its last worker (or the primary)."""
        self.stopping = True
        if self._restart_timer is not None:
            self._restart_timer.cancel()
        if self._spare_timer is not None:
            self._spare_timer.cancel()
        if self.spare is not None:
            self._drop_spare(self.spare)
        for version in [self.current, *self.others]:
            if version is not None and version.settle is not None:
                version.settle({"error": "stopping"})  # its reader and timer go, then it does
            elif version is not None:
                version.template.retire()

    def describe(self) -> list[dict[str, Any]]:
        return [v.describe() for v in [self.current, *self.others] if v is not None]


def _read_answer(version: Version, settle: Callable[[dict[str, Any]], None]) -> None:
    answer = version.template.message_now()
    if answer is None and version.template.alive:
        return  # nothing whole yet
    if answer is not None and answer.get("spare") is True and "ready" not in answer:
        return  # a spare taken while it still imported the machinery: its first word, not the answer
    settle(answer or {})


def _manager_vars() -> frozenset[str]:
    from .primary import MANAGER_VARS

    return MANAGER_VARS
