"""The primary's control socket under bad or hostile clients (src/prefork/control.py): every request
gets one bounded answer, idle clients are dropped, connections are bounded, and the accept thread lives
on. A real `prefork serve` and raw unix socket clients."""

from __future__ import annotations

import json
import socket
import time

import pytest
from cli_helpers import Cmd, free_port, pid_alive, prefork_cmd, run_prefork  # noqa: F401

MAX_CONNECTIONS = 32  # src/prefork/control.py


@pytest.fixture
def primary(prefork_cmd, tmp_path):  # noqa: F811
    control = str(tmp_path / "c.sock")
    cmd = prefork_cmd("serve", "tests.apps.star:app", "--workers", "1", "--bind", f"127.0.0.1:{free_port()}",
                      "--control", control)
    cmd.wait_ready()
    cmd.track_workers(control)
    yield control
    assert cmd.proc.poll() is None, cmd.output  # no bad request took the primary down
    assert run_prefork(["ctl", "--control", control, "stop"]).returncode == 0
    assert cmd.finish() == 0, cmd.output


@pytest.fixture(scope="module")
def shared_primary(tmp_path_factory):
    """One primary for all the bad requests below (each is checked to leave it serving, and the
    primary alive, before the next): the same checks as `primary`, without 14 starts and stops."""
    folder = tmp_path_factory.mktemp("control")
    control = str(folder / "c.sock")
    cmd = Cmd(["serve", "tests.apps.star:app", "--workers", "1", "--bind", f"127.0.0.1:{free_port()}",
               "--control", control])
    try:
        cmd.wait_ready()
        cmd.track_workers(control)
        yield cmd, control
        assert cmd.proc.poll() is None, cmd.output  # no bad request took the primary down
        assert run_prefork(["ctl", "--control", control, "stop"]).returncode == 0
        assert cmd.finish() == 0, cmd.output
    finally:
        cmd.kill_all()
        for pid in cmd.worker_pids:
            assert not pid_alive(pid), f"worker pid {pid} survived its primary"


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _ask(control: str, payload: bytes, timeout: float = 15.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(control)
        sock.sendall(payload)
        data = _read_reply(sock)
    assert data.endswith(b"\n"), f"no reply line to {payload[:40]!r}: {data[:200]!r}"
    assert len(data) < 2048, f"reply of {len(data)} bytes"
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


def _status_ok(control: str) -> bool:
    return _ask(control, b'{"cmd": "status"}\n').get("ok") is True


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"{not json\n", "not JSON"),
        (b"\xff\xfe\x00\n", "not JSON"),
        (b"[" * 30000 + b"\n", "nested too deeply"),
        (b"[1, 2]\n", "expected a JSON object, not list"),
        (b"null\n", "expected a JSON object, not NoneType"),
        (b'"status"\n', "expected a JSON object, not str"),
        (b"\n", "empty request"),
        (b'{"cmd": "nope"}\n', "unknown command"),
        (b'{"cmd": "scale", "n": "' + b"x" * 60000 + b'"}\n', "cannot scale"),
        (b'{"cmd": "scale", "n": 100000}\n', "from 1 to 1024"),
        (b'{"cmd": "scale", "n": "+100000"}\n', "from 1 to 1024"),
        (b'{"cmd": "scale", "n": true}\n', "cannot scale"),
        (b"x" * 100_000 + b"\n", "request too large"),
        (b"x" * 300_000, "request too large"),  # no newline at all: the rest is read and dropped
    ],
    ids=["bad-json", "not-utf8", "deep-nesting", "list", "null", "string", "empty", "unknown-cmd",
         "long-value", "scale-huge", "scale-plus-huge", "scale-bool", "oversized-line",
         "oversized-no-newline"],
)
def test_every_bad_request_gets_one_bounded_error_reply(shared_primary, payload, error):
    cmd, control = shared_primary
    reply = _ask(control, payload)
    assert reply["ok"] is False and error in reply["error"], reply
    assert _status_ok(control)  # and the server still serves
    assert cmd.proc.poll() is None, cmd.output


def test_a_request_without_newline_then_eof_is_answered(primary):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(primary)
        sock.sendall(b'{"cmd": "status"}')
        sock.shutdown(socket.SHUT_WR)
        reply = json.loads(_read_reply(sock))
    assert reply["ok"] is True and reply["status"]["workers"]


def test_idle_clients_are_bounded_dropped_and_block_nobody(primary):
    idle: list[socket.socket] = []
    try:
        for _ in range(5):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(primary)
            idle.append(s)
        started = time.monotonic()
        assert _status_ok(primary)  # served beside clients that send nothing
        assert time.monotonic() - started < 5
        for _ in range(MAX_CONNECTIONS - 5):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(primary)
            idle.append(s)
        time.sleep(0.5)  # let the accept thread take them all
        busy = _ask(primary, b'{"cmd": "status"}\n', timeout=5)
        assert busy["ok"] is False and "too many control connections" in busy["error"], busy
        result = run_prefork(["ctl", "--control", primary, "status"])
        assert result.returncode == 1 and "too many control connections" in result.stderr, result
        for s in idle:  # each idle client is answered and dropped after its timeout (10 s)
            s.settimeout(20)
            data = _read_reply(s)
            assert b"no request line within" in data, data
            assert s.recv(1) == b""
    finally:
        for s in idle:
            s.close()
    assert _status_ok(primary)
    assert run_prefork(["ctl", "--control", primary, "status"]).returncode == 0
