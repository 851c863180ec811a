"""Helpers for the CLI tests: run the installed `prefork` command as a user would, and clean up.

`Cmd` starts `.venv/bin/prefork ...` in its own session with stdout and stderr merged, collects its
lines, and on teardown stops it (SIGTERM, then SIGKILL to its group and every worker pid seen).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PREFORK = str(ROOT / ".venv" / "bin" / "prefork")


_given: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, and none this test run was given before: the kernel may hand
    the same port to two binds in a row, and a test's --bind and --admin then collided."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _given:
            _given.add(port)
            return port


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFORK_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(")") + 2] not in ("Z", "X")


class Cmd:
    """One running `prefork` command."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT, preexec_fn: object = None
    ) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [PREFORK, *args],
            cwd=cwd,
            env=clean_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )  # type: ignore[arg-type]
        self.pgid = self.proc.pid
        self.worker_pids: set[int] = set()
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            with self._cond:
                self._lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self._lines)

    def expect(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._lines:
                    m = regex.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    break
                self._cond.wait(min(left, 0.1))
        pytest.fail(f"no line matched {pattern!r} in {timeout}s (exit {self.proc.poll()})\n{self.output}")

    def wait_ready(self, timeout: float = 20.0) -> None:
        self.expect(r"\[prefork\] ready: \d+ worker", timeout)

    def finish(self, timeout: float = 20.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"prefork still running after {timeout}s\n{self.output}")
        self._reader.join(3.0)
        return code

    def track_workers(self, control: str) -> list[int]:
        """The worker pids, from `ctl status --json` (also remembered for the teardown)."""
        status = ctl_json(control)
        pids = [w["pid"] for w in status["workers"]]
        self.worker_pids.update(pids)
        return pids

    def kill_all(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for pid in [self.pgid, *self.worker_pids]:
            try:
                (os.killpg if pid == self.pgid else os.kill)(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(2.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def run_prefork(
    args: list[str], timeout: float = 20.0, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PREFORK, *args],
        cwd=cwd,
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ctl_json(control: str) -> dict[str, object]:
    result = run_prefork(["ctl", "--control", control, "status", "--json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def prefork_cmd():
    """Start `prefork` commands; every one (and its workers) is stopped on teardown."""
    started: list[Cmd] = []

    def start(
        *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, preexec_fn: object = None
    ) -> Cmd:
        cmd = Cmd(list(args), env, cwd, preexec_fn)
        started.append(cmd)
        return cmd

    try:
        yield start
    finally:
        for cmd in started:
            cmd.kill_all()
        for cmd in started:
            for pid in cmd.worker_pids:
                assert not pid_alive(pid), f"worker pid {pid} survived its primary"
