"""reuseport after the pool shrinks: every SO_REUSEPORT socket of the group keeps a live acceptor.

The recipe of the fault: serve with two workers, scale to one, then kill the remaining worker twice,
each time waiting for its replacement to be ready. Connections the kernel hashes to a socket that no
live worker accepts from hang until the client gives up, so every request must still be answered.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
from cli_helpers import ctl_json, free_port, prefork_cmd, run_prefork  # noqa: F401


def _ready_pids(control: str) -> list[int]:
    return [w["pid"] for w in ctl_json(control)["workers"] if w["state"] == "ready"]


def _wait_single_ready(control: str, not_pid: int | None, timeout: float = 30.0) -> int:
    """Wait until exactly one worker is listed, it is ready, and it is not `not_pid`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = ctl_json(control)["workers"]
        if len(workers) == 1 and workers[0]["state"] == "ready" and workers[0]["pid"] != not_pid:
            return int(workers[0]["pid"])
        time.sleep(0.1)
    raise AssertionError(f"no single ready worker in {timeout}s: {ctl_json(control)}")


def _get(port: int) -> bool:
    """One request on a fresh connection; False if it is not answered within 2 s."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
        return data.startswith(b"HTTP/1.1 200") and data.endswith(b"hello world\n")
    except OSError:
        return False


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kills", [1, 2])
def test_scale_down_then_crashes_loses_nothing(prefork_cmd, tmp_path, kills):  # noqa: F811
    port = free_port()
    control = str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", "tests.apps.hello:asgi", "--workers", "2", "--bind", f"127.0.0.1:{port}",
                      "--control", control)
    cmd.wait_ready()
    cmd.track_workers(control)
    result = run_prefork(["ctl", "--control", control, "scale", "1"])
    assert result.returncode == 0, result.stdout + result.stderr
    pid = _wait_single_ready(control, None)
    for _ in range(kills):
        cmd.worker_pids.add(pid)
        os.kill(pid, signal.SIGKILL)
        pid = _wait_single_ready(control, pid)
    cmd.worker_pids.add(pid)
    answered = sum(_get(port) for _ in range(30))
    assert answered == 30, f"{30 - answered} of 30 requests unanswered\n{cmd.output}"
