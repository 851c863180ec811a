"""Process titles as `ps` shows them: `prefork: primary APP` and `prefork: worker N APP`, through
setproctitle when installed, and the kernel's 15-character name (prctl) either way."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
from pathlib import Path

import pytest
from cli_helpers import free_port, prefork_cmd  # noqa: F401
from conftest import wait_until

HAS_SETPROCTITLE = importlib.util.find_spec("setproctitle") is not None

SCRIPT = '''
import time
import prefork

while True:
    time.sleep(0.2)
'''


def _args(pid: int) -> str:
    """What `ps -o args=` shows (the title setproctitle wrote, or the real command line); -ww: not
    cut at 80 columns, which a long venv path (CI's copies) passes."""
    return subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True,
                          timeout=10).stdout.strip()


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _serve(prefork_cmd, tmp_path: Path, env: dict[str, str] | None = None):  # noqa: F811
    control = str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", "tests.apps.hello:asgi", "--workers", "2", "--bind",
                      f"127.0.0.1:{free_port()}", "--control", control, env=env)
    cmd.wait_ready(30)
    return cmd, control


def _stop(cmd) -> None:
    cmd.proc.send_signal(signal.SIGTERM)
    assert cmd.finish() == 0, cmd.output


@pytest.mark.skipif(not HAS_SETPROCTITLE, reason="setproctitle is not installed (prefork[proctitle])")
def test_serve_titles_with_setproctitle(prefork_cmd, tmp_path):  # noqa: F811
    cmd, control = _serve(prefork_cmd, tmp_path)
    pids = sorted(cmd.track_workers(control))
    assert _args(cmd.proc.pid) == "prefork: primary tests.apps.hello:asgi"
    titles = sorted(_args(pid) for pid in pids)
    assert titles == ["prefork: worker 1 tests.apps.hello:asgi", "prefork: worker 2 tests.apps.hello:asgi"]
    assert _comm(cmd.proc.pid) == "prefork-primary"
    assert sorted(_comm(pid) for pid in pids) == ["prefork-w1", "prefork-w2"]
    _stop(cmd)


def test_serve_titles_without_setproctitle(prefork_cmd, tmp_path):  # noqa: F811
    """PREFORK_SETPROCTITLE=0 acts as if it were not installed: the command line stays, the
    kernel's name (top, ps -o comm, /proc/PID/comm) says what each process is."""
    cmd, control = _serve(prefork_cmd, tmp_path, env={"PREFORK_SETPROCTITLE": "0"})
    pids = cmd.track_workers(control)
    assert _comm(cmd.proc.pid) == "prefork-primary"
    assert sorted(_comm(pid) for pid in pids) == ["prefork-w1", "prefork-w2"]
    # the real command line, untouched: the template's, which forked it (serve preloads by default)
    assert "prefork.template_boot" in _args(pids[0])
    _stop(cmd)


def test_run_titles(prefork_cmd, tmp_path):  # noqa: F811
    script = tmp_path / "idle.py"
    script.write_text(SCRIPT)
    control = str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("run", "--workers", "2", "--ready", "online", "--graceful-timeout", "1",
                      "--control", control, str(script))
    cmd.wait_ready(30)
    pids = cmd.track_workers(control)
    assert wait_until(lambda: sorted(_comm(p) for p in pids) == ["prefork-w1", "prefork-w2"], 10)
    if HAS_SETPROCTITLE:  # set before the script runs; "online" may come a little earlier
        assert _args(cmd.proc.pid) == "prefork: primary idle.py"
        titles = ["prefork: worker 1 idle.py", "prefork: worker 2 idle.py"]
        assert wait_until(lambda: sorted(_args(p) for p in pids) == titles, 10), [_args(p) for p in pids]
    assert _comm(cmd.proc.pid) == "prefork-primary"
    _stop(cmd)
