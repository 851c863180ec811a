"""`prefork serve` answers byte for byte as uvicorn does (but for the Date header), for every shape of
response the framing depends on: prefork writes responses its own, faster way (prefork/http/onewrite.py)."""

from __future__ import annotations

import re
import socket
import subprocess
import time

import pytest
from cli_helpers import ROOT, clean_env, free_port, prefork_cmd  # noqa: F401

APP = "tests.apps.responses:app"
REQUESTS = {
    "length": b"GET /length HTTP/1.1\r\nHost: t\r\n\r\n",
    "chunks": b"GET /chunks HTTP/1.1\r\nHost: t\r\n\r\n",
    "head": b"HEAD /length HTTP/1.1\r\nHost: t\r\n\r\n",
    "head-chunks": b"HEAD /chunks HTTP/1.1\r\nHost: t\r\n\r\n",
    "204": b"GET /empty HTTP/1.1\r\nHost: t\r\n\r\n",
    "echo": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello there",
    "echo-chunked": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    "big": b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n",
    "app-closes": b"GET /close HTTP/1.1\r\nHost: t\r\n\r\n",
    "client-closes": b"GET /length HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    "http10": b"GET /length HTTP/1.0\r\n\r\n",
    "http10-keep-alive": b"GET /length HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "teapot": b"GET /teapot HTTP/1.1\r\nHost: t\r\n\r\n",
    "pipelined": b"GET /length HTTP/1.1\r\nHost: t\r\n\r\nGET /chunks HTTP/1.1\r\nHost: t\r\n\r\n"
    b"GET /nothing HTTP/1.1\r\nHost: t\r\n\r\n",
    "bad-header": b"GET /bad-header HTTP/1.1\r\nHost: t\r\n\r\n",
    "bad-request": b"GET / HTTP/1.1\r\nHost: t\r\nbad header\r\n\r\n",
}


def _exchange(port: int, request: bytes) -> bytes:
    """Send the request, read until the server closes or stays quiet for 0.3 s; Date lines dropped."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        s.settimeout(0.3)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
    return re.sub(rb"(?im)^date: [^\r\n]*\r\n", b"", data)


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def uvicorn_port():
    port = free_port()
    proc = subprocess.Popen(
        [
            str(ROOT / ".venv" / "bin" / "uvicorn"),
            "--http",
            "httptools",
            "--port",
            str(port),
            "--log-level",
            "critical",
            "--no-access-log",
            "--no-server-header",  # prefork names no server by default (--server-header: prefork)
            APP,
        ],
        cwd=ROOT,
        env=clean_env({"PYTHONPATH": str(ROOT)}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def prefork_port(tmp_path_factory):
    from cli_helpers import Cmd

    port = free_port()
    control = str(tmp_path_factory.mktemp("ctl") / "ctl.sock")
    cmd = Cmd(
        [
            "serve",
            APP,
            "--workers",
            "1",
            "--bind",
            f"127.0.0.1:{port}",
            "--control",
            control,
            "--log-level",
            "critical",
        ],
        env={"PYTHONPATH": str(ROOT)},
    )
    try:
        cmd.wait_ready()
        cmd.track_workers(control)
        yield port
    finally:
        cmd.kill_all()


@pytest.mark.parametrize("name", list(REQUESTS))
def test_same_bytes_as_uvicorn(uvicorn_port, prefork_port, name):
    ours = _exchange(prefork_port, REQUESTS[name])
    theirs = _exchange(uvicorn_port, REQUESTS[name])
    if name == "bad-header":  # nothing was written yet: prefork answers a whole 500, uvicorn closes mute
        assert theirs == b""
        assert ours.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
        assert ours.endswith(b"connection: close\r\n\r\nInternal Server Error")
        return
    assert ours == theirs
    assert ours  # something was answered
