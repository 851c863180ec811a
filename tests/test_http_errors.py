"""`prefork serve` on real sockets when an app fails mid-response, and when it streams: a whole 500 while
nothing was written, a closed connection once bytes went out, a streaming app's head at once, and hello
world still in one write (src/prefork/http/onewrite.py)."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time

import pytest
from cli_helpers import ROOT, Cmd, free_port
from conftest import wait_until

APP = "tests.apps.http_errors:app"
FAILURE_LOG = "Exception in ASGI application"
WHOLE_500 = re.compile(
    rb"HTTP/1\.1 500 Internal Server Error\r\n(?:[a-z-]+: [^\r\n]*\r\n)*\r\nInternal Server Error\Z"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `prefork serve` of tests/apps/http_errors.py with one worker: (port, Cmd, worker pid)."""
    port = free_port()
    control = str(tmp_path_factory.mktemp("ctl") / "ctl.sock")
    cmd = Cmd(["serve", APP, "--workers", "1", "--bind", f"127.0.0.1:{port}", "--control", control,
               "--access-log"],
              env={"PYTHONPATH": str(ROOT)})
    try:
        cmd.wait_ready()
        (pid,) = cmd.track_workers(control)
        yield port, cmd, pid
    finally:
        cmd.kill_all()


def _request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


def _until_closed(port: int, path: str, timeout: float = 20.0) -> bytes:
    """Everything the server sends for one request; fails unless the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(_request(path))
        data = b""
        while chunk := s.recv(65536):  # a timeout raises: the connection was left open
            data += chunk
    return data


def _failures(cmd: Cmd) -> int:
    return cmd.output.count(FAILURE_LOG)


def _logged_once(cmd: Cmd, before: int, port: int) -> None:
    assert wait_until(lambda: _failures(cmd) > before, timeout=20), cmd.output
    _until_closed(port, "/too-long")  # a later failure of the same worker: its log line comes after
    assert wait_until(lambda: _failures(cmd) > before + 1, timeout=20), cmd.output
    assert _failures(cmd) == before + 2, cmd.output  # one traceback per failure


@pytest.mark.parametrize("path", ["/raise-after-start", "/second-start", "/too-long"])
def test_a_whole_500_while_nothing_was_written(server, path):
    port, cmd, _pid = server
    before = _failures(cmd)
    answer = _until_closed(port, path)
    assert WHOLE_500.match(answer), answer
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert b"\r\nconnection: close" in head and b"\r\ncontent-length: 21" in head
    assert b"transfer-encoding" not in head and b"text/plain; charset=utf-8" in head
    _logged_once(cmd, before, port)
    assert f'"GET {path} HTTP/1.1" 500 ' in cmd.output  # the access line says what the client got


@pytest.mark.parametrize("path", ["/raise-after-body", "/raise-after-yield", "/trailers-after-yield"])
def test_after_bytes_went_out_the_connection_closes(server, path):
    port, cmd, _pid = server
    before = _failures(cmd)
    answer = _until_closed(port, path)  # closed, else a timeout
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert b"500" not in answer.split(b"\r\n", 1)[1]
    assert b"transfer-encoding: chunked\r\n" in answer
    assert not answer.endswith(b"0\r\n\r\n")  # the response was cut, not ended
    if path == "/raise-after-body":
        assert answer.endswith(b"\r\n\r\n7\r\npartial\r\n"), answer
    else:
        assert answer.endswith(b"\r\n\r\n"), answer  # the head alone: flushed, then the app failed
    _logged_once(cmd, before, port)


def test_a_streaming_head_arrives_before_its_first_event(server):
    """The SSE app sends its start, sleeps 1 s, then its first event: the head must not wait for it."""
    port, _cmd, _pid = server
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(_request("/sse"))
        sent = time.monotonic()
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head_at = time.monotonic()
        assert b"data: one" not in data, data  # the head came alone
        while b"data: one\n\n" not in data:
            data += s.recv(65536)
        event_at = time.monotonic()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-type: text/event-stream" in data
    assert head_at - sent < 0.8, f"the head took {head_at - sent:.3f} s"
    assert event_at - sent >= 0.95, f"the event came after {event_at - sent:.3f} s"


def test_hello_world_is_one_write(server):
    """strace counts the worker's write calls on the connection: the head and body go out together."""
    port, _cmd, pid = server
    if shutil.which("strace") is None:
        pytest.skip("strace not installed (apt-get install strace)")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:  # warm-up (first-use work)
        s.sendall(_request("/hello"))
        s.recv(65536)
    log = ROOT / ".pytest_cache" / f"strace-{pid}.txt"
    log.parent.mkdir(exist_ok=True)
    tracer = subprocess.Popen(
        ["strace", "-f", "-s", "40", "-e", "trace=write,sendto,writev,sendmsg", "-o", str(log),
         "-p", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        assert tracer.stderr is not None
        attached = tracer.stderr.readline()
        assert b"attached" in attached, attached
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(_request("/hello"))
            answer = b""
            while not answer.endswith(b"hello world\n"):
                answer += s.recv(65536)
            time.sleep(0.2)  # any further write of this response would have come by now
    finally:
        tracer.send_signal(signal.SIGTERM)
        tracer.wait(10)
    calls = re.findall(r"\b(write|sendto|writev|sendmsg)\((\d+), (.*)", log.read_text())
    log.unlink()
    fds = {fd for _name, fd, rest in calls if "HTTP/1.1 200 OK" in rest}
    assert len(fds) == 1, calls
    on_connection = [c for c in calls if c[1] in fds]
    assert len(on_connection) == 1, on_connection
