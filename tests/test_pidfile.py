"""--pid FILE (--pidfile): the primary's pid, written atomically once the control socket is up,
removed on exit only while it still names this primary; a live prefork's file refuses a second
start, a stale one is replaced (#12)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import free_port, prefork_cmd, run_prefork  # noqa: F401

APP = "tests.apps.hello:asgi"
pytestmark = pytest.mark.timeout(60)


def _serve(prefork_cmd, tmp_path: Path, pid: Path, name: str = "a", flag: str = "--pid"):  # noqa: F811
    return prefork_cmd("serve", APP, "--workers", "1", "--bind", f"127.0.0.1:{free_port()}", "--no-preload",
                       "--control", str(tmp_path / f"{name}.sock"), flag, str(pid))


def _wait_file(path: Path, content: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text() == content):
        assert time.monotonic() < deadline, f"{path}: {path.read_text() if path.exists() else 'missing'}"
        time.sleep(0.05)


def test_pid_file_is_written_and_removed_on_exit(prefork_cmd, tmp_path):  # noqa: F811
    pid = tmp_path / "run" / "prefork.pid"
    pid.parent.mkdir()
    cmd = _serve(prefork_cmd, tmp_path, pid, flag="--pidfile")
    cmd.wait_ready(30)
    assert pid.read_text() == f"{cmd.proc.pid}\n"
    assert os.listdir(pid.parent) == ["prefork.pid"]  # no temporary file left beside it
    cmd.proc.send_signal(signal.SIGTERM)
    assert cmd.finish() == 0, cmd.output
    assert not pid.exists()


def test_a_running_prefork_refuses_a_second_start(prefork_cmd, tmp_path):  # noqa: F811
    pid = tmp_path / "prefork.pid"
    first = _serve(prefork_cmd, tmp_path, pid)
    first.wait_ready(30)
    second = _serve(prefork_cmd, tmp_path, pid, name="b")
    assert second.finish() == 1, second.output
    assert second.output.strip().splitlines() == \
        [f"prefork: error: already running as pid {first.proc.pid} ({pid})"]
    assert pid.read_text() == f"{first.proc.pid}\n"  # left as it was
    assert first.proc.poll() is None


def test_a_stale_pid_file_is_replaced(prefork_cmd, tmp_path):  # noqa: F811
    pid = tmp_path / "prefork.pid"
    gone = subprocess.Popen(["true"])
    gone.wait()
    other = subprocess.Popen(["sleep", "60"])  # alive, but not a prefork (a reused pid)
    try:
        for stale in (gone.pid, other.pid, "garbage"):
            pid.write_text(f"{stale}\n")
            cmd = _serve(prefork_cmd, tmp_path, pid, name=str(stale))
            cmd.wait_ready(30)
            assert pid.read_text() == f"{cmd.proc.pid}\n"
            cmd.proc.send_signal(signal.SIGTERM)
            assert cmd.finish() == 0, cmd.output
            assert not pid.exists()
    finally:
        other.kill()
        other.wait()


def test_a_file_naming_another_primary_is_left_on_exit(prefork_cmd, tmp_path):  # noqa: F811
    """A hot upgrade's new primary rewrites the file: the old one, exiting, must not remove it."""
    pid = tmp_path / "prefork.pid"
    cmd = _serve(prefork_cmd, tmp_path, pid)
    cmd.wait_ready(30)
    pid.write_text("4194000\n")
    cmd.proc.send_signal(signal.SIGTERM)
    assert cmd.finish() == 0, cmd.output
    assert pid.read_text() == "4194000\n"


def test_an_unwritable_pid_file_is_one_line_exit_1(tmp_path):
    result = run_prefork(["serve", APP, "--no-preload", "--bind", f"127.0.0.1:{free_port()}", "--control",
                          str(tmp_path / "c.sock"), "--pid", str(tmp_path / "no" / "such" / "p.pid")])
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines() == \
        [f"prefork: error: --pid {tmp_path}/no/such/p.pid: cannot write it: No such file or directory"]
