"""The fork template: one single-threaded process that forks the workers of `start="fork"`.

Forking the primary itself means forking a process with threads (its loop, the control socket's,
the user's own), and a child inherits every lock as it was at that instant: one held by another
thread (a stdio buffer's, blocked on a full pipe; a library's) stays held for good, and the child
hangs on its first print. So `setup_primary(start="fork")`, called while the primary has only its
main thread, forks this template at once: a copy of the primary with the app imported and no other
thread, ever. The primary sends it one request per worker (its environment, whether it gets a
session of its own, and its end of the channel as SCM_RIGHTS); the template forks, and the child
becomes the worker (forkstart.py). Only a parent may wait for its child, so the template reports
each worker's exit status back. When the template is gone, or the primary had threads already at
`setup_primary`, the primary forks from its loop thread instead (forkstart.fork_worker).

Messages on a SOCK_SEQPACKET pair, one JSON object each:
    primary -> template: {"env": {...}, "group": bool} + the channel's descriptor
    template -> primary: {"pid": int} or {"error": str} (the answer), {"exit": pid, "code": int}
"""

from __future__ import annotations

import array
import gc
import json
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable

from . import _proc
from .forkstart import ForkedProcess, become_worker_and_run

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_MESSAGE = 1 << 20  # a worker's environment, as JSON
UNKNOWN_EXIT = 1  # the template died before it could say how one of its workers ended
REPORT_WAIT = 3.0  # seconds an exited worker's status may take to come from the template (ms, normally)


def start(target: Callable[[], Any], keep_fds: set[int]) -> Template | None:
    """Fork the template now, if the primary is single-threaded; else None (fork from the loop)."""
    if threading.active_count() != 1:
        return None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    primary_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # the template: never returns into the user's script
        code = 1
        try:
            ours.close()
            code = _serve(theirs, target, keep_fds - {theirs.fileno()}, primary_pid)
        finally:
            _proc.exit_now(code)
    theirs.close()
    return Template(pid, ours)


class Template:
    """The primary's handle on its template process."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.alive = True
        self.exits: dict[int, int] = {}  # worker pid -> exit code, reported and not yet taken
        self._lock = threading.Lock()  # Worker.kill() may poll from any thread

    def fork(self, env: dict[str, str], channel_fd: int, own_group: bool, timeout: float = 5.0) -> Forked:
        """Ask for one worker; OSError if the template cannot give one (the caller falls back)."""
        request = json.dumps({"env": env, "group": own_group}).encode()
        with self._lock:
            if not self.alive:
                raise OSError("the fork template has gone")
            try:
                self.sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", [channel_fd]))])
            except OSError:
                self._gone()
                raise
            deadline = time.monotonic() + timeout
            while self.alive:
                answer = self._read(max(0.0, deadline - time.monotonic()))
                if answer is None:
                    break
                if "pid" in answer:
                    return Forked(answer["pid"], self)
                if "error" in answer:
                    raise OSError(f"the fork template could not fork: {answer['error']}")
            self._gone()
            raise OSError("the fork template did not answer")

    def poll(self, pid: int, timeout: float = 0.0) -> int | None:
        """The exit code of worker `pid`, once the template has reported it; waits up to
        `timeout` for the report (the caller knows the worker has exited: it comes at once)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                while self.alive and pid not in self.exits and self._read(0.0) is not None:
                    pass
                if pid in self.exits:
                    return self.exits.pop(pid)
                if not self.alive:
                    return UNKNOWN_EXIT
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._read(min(left, 0.05))  # sleeps in recv until the report comes

    def close(self) -> None:
        with self._lock:
            self._gone()

    def retire(self) -> None:
        """Fork no more: the template exits once its last worker has (versions.py)."""
        with self._lock:
            if self.alive:
                try:
                    self.sock.send(b'{"retire": true}')
                except OSError:
                    self._gone()

    def message_now(self) -> dict[str, Any] | None:
        """The next message if a whole one is there (the loop's reader calls this; versions.py)."""
        with self._lock:
            return self._read(0.0) if self.alive else None

    def pump(self) -> None:
        """File what the template has said (exit reports; its end): the primary's loop calls this
        when the socket is readable, so a template that exits is reaped at once."""
        with self._lock:
            while self.alive and self._read(0.0) is not None:
                pass

    def _read(self, timeout: float) -> dict[str, Any] | None:
        """One message (exit reports are filed); None when none came within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(MAX_MESSAGE)
        except (BlockingIOError, TimeoutError):
            return None
        except OSError:
            data = b""
        if not data:
            self._gone()
            return None
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        if not _well_formed(message):  # the app's own code runs there: a template that says this is broken
            self._gone()
            return None
        if "exit" in message:
            self.exits[message["exit"]] = message["code"]
        return message

    def _gone(self) -> None:
        """The template ended, or cannot be trusted any more: end it (a stopped or confused one
        would never exit by itself, and the loop must not wait for it), then reap it."""
        if self.alive:
            self.alive = False
            self.sock.close()
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(self.pid, 0)  # no zombie; SIGKILL ends even a stopped process at once
            except ChildProcessError:
                pass


def _well_formed(message: Any) -> bool:
    """What a template may say: a worker's pid (a real one, never 0, -1 or our own group), a worker's
    exit with an int code, an error line, or (versions.py) ready/error with its details."""
    if not isinstance(message, dict):
        return False
    if "pid" in message:
        return type(message["pid"]) is int and message["pid"] > 1
    if "exit" in message:
        return type(message["exit"]) is int and message["exit"] > 1 and type(message.get("code")) is int
    if "ready" in message:
        return isinstance(message["ready"], dict)
    if "spare" in message:
        return message["spare"] is True
    return isinstance(message.get("error"), str)


class Forked(ForkedProcess):
    """`worker.process` for a worker the template forked: its parent is the template, so its exit
    status comes from the template's report, not from waitpid (forkstart.ForkedProcess does the rest)."""

    def __init__(self, pid: int, template: Template) -> None:
        super().__init__(pid)
        self._template = template

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._template.poll(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """As Popen.wait. With no timeout it is called once the worker has exited (its pidfd said
        so), and the template's report follows at once; should none come, the loop that called it
        must not hang: after REPORT_WAIT the exit counts as UNKNOWN_EXIT."""
        import subprocess

        limit = REPORT_WAIT if timeout is None else timeout
        if self.returncode is None:
            self.returncode = self._template.poll(self.pid, limit)
        if self.returncode is None:
            if timeout is not None:
                raise subprocess.TimeoutExpired([str(self.pid)], timeout)
            self.returncode = UNKNOWN_EXIT
        return self.returncode


# -- in the template process ---------------------------------------------------------------------


def _serve(sock: socket.socket, target: Callable[[], Any], keep_fds: set[int], primary_pid: int) -> int:
    """Fork a worker per request and report each one's exit, until the primary goes away, or, once
    retired (a newer template took over: versions.py), until the last of its workers has exited."""
    _proc.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != primary_pid:
        return 1
    from .signals import reset_in_child

    reset_in_child()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the primary's to handle
    # What the template imported lives as long as its workers: frozen before the first fork, it is
    # out of every worker's collections, which would otherwise write to (and so copy) its pages
    # (the order CPython's gc.freeze documentation gives: collect, freeze, fork).
    gc.collect()
    gc.freeze()
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, None)
    retired = False
    while True:
        for key, _ in selector.select():
            if key.data is None:
                answer = _answer(sock, selector, target, keep_fds, retired)
                if answer is None:
                    return 0
                retired = retired or answer == "retire"
            else:
                _report_exit(sock, selector, key.data, key.fd)
        if retired and len(selector.get_map()) == 1:  # only the primary's socket is left
            return 0


def _answer(sock: socket.socket, selector: selectors.BaseSelector, target: Callable[[], Any],
            keep_fds: set[int], retired: bool) -> str | None:
    """One request: fork the worker and answer with its pid, or take a retirement; None once the
    primary has gone."""
    from .channel import fds_in

    try:
        data, anc, _flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
    except OSError:
        return None
    fds = fds_in(anc)
    if not data:
        return None
    try:
        request = json.loads(data)
        if request.get("retire"):
            return "retire"
        if retired:
            raise OSError("this template has retired")
        pid = _fork_worker(dict(request["env"]), fds[0], bool(request["group"]), target, keep_fds)
        selector.register(os.pidfd_open(pid), selectors.EVENT_READ, pid)
        answer: dict[str, Any] = {"pid": pid}
    except Exception as exc:  # one failed fork fails that start only
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        for fd in fds:
            os.close(fd)
    sock.send(json.dumps(answer).encode())
    return "forked"


def _fork_worker(env: dict[str, str], channel_fd: int, own_group: bool, target: Callable[[], Any],
                 keep_fds: set[int]) -> int:
    env["PREFORK_PRIMARY_PID"] = str(os.getpid())  # the worker's parent: its death ends the worker
    env["PREFORK_CHANNEL_FD"] = str(channel_fd)  # its number here, not in the primary
    pid = os.fork()
    if pid == 0:
        become_worker_and_run(env, channel_fd, own_group, target, keep_fds)
    return pid


def _report_exit(sock: socket.socket, selector: selectors.BaseSelector, pid: int, pidfd: int) -> None:
    selector.unregister(pidfd)
    os.close(pidfd)
    try:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
    except ChildProcessError:
        code = UNKNOWN_EXIT
    try:
        sock.send(json.dumps({"exit": pid, "code": code}).encode())
    except OSError:
        pass
