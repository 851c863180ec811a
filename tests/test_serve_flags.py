"""Flags of `prefork serve` that uvicorn and gunicorn users bring along (#14): each on a real server,
and each bad value refused with one line naming the flag and its range (exit 2)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from cli_helpers import Cmd, free_port, prefork_cmd, run_prefork  # noqa: F401

APP = "tests.apps.hello:asgi"
pytestmark = pytest.mark.timeout(60)

BAD = [
    ("--backlog", str(10**20), "from 1 to 65535"),
    ("--keep-alive", "0", "from 1 to 86400"),
    ("--timeout-keep-alive", "1e9", "from 1 to 86400"),
    ("--limit-concurrency", "0", "from 1 to"),
    ("--timeout-header", "-1", "from 0 to 3600"),
    ("--http1-header-read-timeout", "nan", "from 0 to 3600"),
    ("--limit-request-line", "10000000", "from 0 to 1048576"),
    ("--limit-request-fields", "40000", "from 0 to 32768"),
    ("--limit-request-field_size", "x", "from 0 to 1048576"),
]


@pytest.mark.parametrize(("flag", "value", "words"), BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_bad_values_are_one_line_exit_2(flag, value, words):
    result = run_prefork(["serve", APP, flag, value])
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert flag.split("_")[0] in lines[0] and words in lines[0], lines[0]


def _serve(prefork_cmd, tmp_path: Path, *extra: str):  # noqa: F811
    port = free_port()
    cmd = prefork_cmd("serve", APP, "--workers", "1", "--bind", f"127.0.0.1:{port}", "--control",
                      str(tmp_path / "ctl.sock"), *extra)
    cmd.wait_ready(30)
    return cmd, port


def _get(sock: socket.socket) -> bytes:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"hello world\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_limit_concurrency_answers_503_past_it(prefork_cmd, tmp_path):  # noqa: F811
    _cmd, port = _serve(prefork_cmd, tmp_path, "--limit-concurrency", "2")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as first:
        assert _get(first).startswith(b"HTTP/1.1 200 ")  # one connection open, idle
        with socket.create_connection(("127.0.0.1", port), timeout=20) as second:
            second.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert second.recv(65536).startswith(b"HTTP/1.1 503 ")
    deadline = time.monotonic() + 20
    while True:  # the worker sees both connections close, then serves again
        with socket.create_connection(("127.0.0.1", port), timeout=20) as again:
            reply = _get(again)
        if reply.startswith(b"HTTP/1.1 200 ") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert reply.startswith(b"HTTP/1.1 200 "), reply


def test_timeout_keep_alive_closes_an_idle_connection(prefork_cmd, tmp_path):  # noqa: F811
    _cmd, port = _serve(prefork_cmd, tmp_path, "--timeout-keep-alive", "1")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        assert _get(sock).startswith(b"HTTP/1.1 200 ")
        start = time.monotonic()
        assert sock.recv(100) == b""
        assert 0.8 <= time.monotonic() - start < 10
