"""Fork-based worker start: for apps preloaded in the primary, a worker is an `os.fork()` away.

A fresh interpreter costs tens of milliseconds before the app is even imported; a fork costs about
one (tests/test_fork.py prints the fork-to-online time). The forked child drops everything the
primary's runtime opened (its loop, the other workers' channels, listening sockets, the control
socket), turns itself into a worker and runs the `target` function, then ends as a worker script
would.

Workers are forked by the fork template (template.py), a single-threaded copy of the primary
made at `setup_primary(start="fork")`, so no other thread's lock can be inherited held. Only when
the primary already had threads at that call, or the template has gone, does the primary fork from
its loop thread (fork_worker below): no loop callback is then half-way through a write, and
prefork's own other threads (control.py's) touch no lock a worker needs, but a user's thread may;
Python 3.12+ warns about such a fork, and the warning is not silenced here.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from . import _proc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn



class ForkedProcess:
    """`worker.process` for a forked worker: what Popen offers that prefork uses."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired([str(self.pid)], timeout or 0)
            time.sleep(0.005)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # gone, and reaped by its parent already
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def fork_worker(env: dict[str, str], channel_fd: int, own_group: bool, target: Callable[[], Any],
                keep_fds: set[int]) -> ForkedProcess:
    """Fork from the primary's loop thread (when there is no template: template.py)."""
    pid = os.fork()
    if pid:
        return ForkedProcess(pid)
    become_worker_and_run(env, channel_fd, own_group, target, keep_fds)


def become_worker_and_run(env: dict[str, str], channel_fd: int, own_group: bool, target: Callable[[], Any],
                          keep_fds: set[int]) -> NoReturn:
    """In a freshly forked child: become a worker, run `target`, and end; never returns."""
    code = 1
    try:
        _become_worker(env, channel_fd, own_group, keep_fds)
        code = _run_target(target)
    finally:
        _proc.exit_now(code)


def _become_worker(env: dict[str, str], channel_fd: int, own_group: bool, keep_fds: set[int]) -> None:
    if own_group:
        os.setsid()
    from .signals import reset_in_child

    reset_in_child()
    _close_inherited(keep_fds | {channel_fd})
    from .binding import forget_adopted

    forget_adopted()
    os.environ.clear()
    os.environ.update(env)
    import prefork

    # prefork was imported before this fork (by the template, or the primary), with the policy of
    # then: a fresh interpreter would read this worker's own from its environment, so must a fork
    prefork.scheduling_policy = env.get("PREFORK_SCHED_POLICY") or prefork.scheduling_policy
    from . import _role
    from .child import bootstrap

    _role.become_worker(bootstrap)


def _close_inherited(keep: set[int]) -> None:
    """Close what the primary's runtime opened after start-up; the preloaded app's fds stay."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _run_target(target: Callable[[], Any]) -> int:
    """Run the worker's function as a script's top level runs: exit code, report, keep-alive."""
    from . import _role

    child = _role.child
    try:
        target()
    except SystemExit as exc:
        return _proc.exit_code(exc)
    except BaseException:
        if not child._on_main_raised(*sys.exc_info()):
            import traceback

            traceback.print_exc()
        return 1
    child._keep_alive()
    return 0
