"""The request head's limits of `prefork serve` (src/prefork/http/limits.py), over real sockets:
--timeout-header (slowloris) and gunicorn's --limit-request-line/-fields/-field-size."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from cli_helpers import Cmd, free_port

APP = "tests.apps.hello:asgi"
pytestmark = pytest.mark.timeout(60)


def _start(folder: Path, *extra: str, app: str = APP) -> tuple[Cmd, int]:
    port = free_port()
    cmd = Cmd(["serve", app, "--workers", "1", "--bind", f"127.0.0.1:{port}", "--control",
               str(folder / "ctl.sock"), *extra])
    try:
        cmd.wait_ready(30)
    except BaseException:
        cmd.kill_all()
        raise
    return cmd, port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cmd, port = _start(tmp_path_factory.mktemp("limits"), "--timeout-header", "1")
    yield port
    cmd.kill_all()


@pytest.fixture(scope="module")
def loose(tmp_path_factory):
    """0 lifts the line and field size limits; 2 fields at most."""
    cmd, port = _start(tmp_path_factory.mktemp("loose"), "--limit-request-line", "0",
                       "--limit-request-field_size", "0", "--limit-request-fields", "2")
    yield port
    cmd.kill_all()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    return sock


def _read_all(sock: socket.socket, deadline: float = 20.0) -> bytes:
    """Everything until the server closes (an RST after a refusal counts as the end too)."""
    sock.settimeout(deadline)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data


def _ask(port: int, head: bytes) -> bytes:
    """The response head (a 200 leaves the connection open: no wait for the keep-alive timeout)."""
    with _connect(port) as sock:
        sock.sendall(head)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
        return data


def test_a_trickled_head_is_closed_after_the_timeout(server):
    with _connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        sock.settimeout(0.5)
        got = b""
        while time.monotonic() - start < 20:
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                try:
                    sock.sendall(b"X")  # one byte of a header every 0.5 s
                except (BrokenPipeError, ConnectionResetError):
                    break
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        elapsed = time.monotonic() - start
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert 0.8 <= elapsed < 10, elapsed


def test_a_silent_connection_is_closed(server):
    with _connect(server) as sock:
        start = time.monotonic()
        assert _read_all(sock) == b""
        assert 0.8 <= time.monotonic() - start < 10


def test_a_normal_client_is_unaffected(server):
    with _connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(20)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        time.sleep(1.6)  # idle between requests: the keep-alive timeout's (5 s), not the head's
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.3)  # a head in two pieces, well within the limit
        sock.sendall(b"\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")


def test_request_line_limit_414(server):
    assert _ask(server, b"GET /" + b"a" * 4076 + b" HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    reply = _ask(server, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 414 "), reply[:200]
    assert b"connection: close" in reply


def test_field_count_limit_431(server):
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(99))
    assert _ask(server, b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n").startswith(b"HTTP/1.1 200 ")
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(100))
    reply = _ask(server, b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]


def test_field_size_limit_431(server):
    ok = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 8000 + b"\r\n\r\n"
    assert _ask(server, ok).startswith(b"HTTP/1.1 200 ")
    reply = _ask(server, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]


def test_a_64_mib_header_value_is_cut_early(server):
    """The worker answers 431 and closes long before the value ends: it never holds it whole."""
    chunk = b"v" * (256 << 10)
    sent = 0
    with _connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Huge: ")
        try:
            while sent < 64 << 20:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = b""
        try:
            reply = _read_all(sock, 5)
        except OSError:
            pass
    # what the kernel's buffers take before the cut (a few MiB at most), not 64 MiB
    assert sent < 16 << 20, sent
    assert reply == b"" or reply.startswith(b"HTTP/1.1 431 "), reply[:200]


def test_zero_lifts_the_limits(loose):
    line = b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 20000 + b"\r\n\r\n"
    assert _ask(loose, line).startswith(b"HTTP/1.1 200 ")
    reply = _ask(loose, b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]


# Request smuggling and framing (#14): what llhttp (httptools), strict as uvicorn runs it, answers.
# Each gets one `400` with `connection: close` and nothing more: a request hidden behind it is not served.
SMUGGLING = {
    "content-length-and-chunked": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "two-content-lengths": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Content-Length: 5\r\n\r\nabcde",
    "same-content-length-twice": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Content-Length: 3\r\n\r\nabc",
    "bare-lf": b"GET / HTTP/1.1\nHost: x\n\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "chunk-size-overflow": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
    "chunked-not-last": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    "signed-content-length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length : 3\r\n\r\nabc",
}


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_smuggling_and_framing_get_400_and_close(server, name):
    with _connect(server) as sock:
        sock.sendall(SMUGGLING[name])
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 400 ") and b"connection: close" in reply, reply
    assert reply.count(b"HTTP/1.1 ") == 1, reply  # the request behind it was not answered


def _rss(pid: int, field: str = "VmRSS") -> int:
    """The resident size now (VmRSS) or its peak so far (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) << 10
    raise AssertionError(f"no VmRSS for {pid}")


IDLE = 10_000


@pytest.mark.timeout(120)
def test_memory_under_abuse(tmp_path):
    """10,000 idle connections and oversized heads: the worker's RSS stays bounded, and the idle
    connections are closed by --timeout-header (they never send a request)."""
    import resource
    import selectors
    import threading

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < IDLE + 500:
        pytest.skip(f"RLIMIT_NOFILE {hard} is below {IDLE + 500}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, IDLE + 500), hard))
    control = str(tmp_path / "ctl.sock")
    cmd, port = _start(tmp_path, "--timeout-header", "3", "--backlog", "4096")
    idle: list[socket.socket] = []
    try:
        worker = cmd.track_workers(control)[0]
        before = _rss(worker)

        def oversized() -> None:  # a 64 MiB header value, 4 at a time: buffered, 256 MiB at least
            chunk = b"v" * (256 << 10)
            with _connect(port) as sock:
                try:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Huge: ")
                    for _ in range(256):
                        sock.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                assert _read_all(sock).startswith((b"HTTP/1.1 431 ", b""))

        threads = [threading.Thread(target=oversized) for _ in range(4)]
        for thread in threads:
            thread.start()
        for _ in range(IDLE):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=20))
        for thread in threads:
            thread.join(60)
        peak = _rss(worker, "VmHWM")
        grown = peak - before
        print(f"worker RSS {before >> 20} MiB -> peak {peak >> 20} MiB with {IDLE} idle connections")
        assert grown < 160 << 20, f"the worker grew by {grown >> 20} MiB"
        selector = selectors.DefaultSelector()
        for sock in idle:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        open_ = len(idle)
        deadline = time.monotonic() + 60
        while open_ and time.monotonic() < deadline:
            for key, _ in selector.select(1.0):
                try:
                    data = key.fileobj.recv(4096)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                if not data:
                    selector.unregister(key.fileobj)
                    open_ -= 1
        selector.close()
        assert open_ == 0, f"{open_} idle connections still open"
    finally:
        for sock in idle:
            sock.close()
        cmd.kill_all()


def test_a_websocket_outlives_the_header_timeout(tmp_path):
    """WebSocket protocols share the worker's set of connections: the sweep leaves them alone."""
    from websockets.sync.client import connect

    cmd, port = _start(tmp_path, "--timeout-header", "1", app="tests.apps.star:app")
    try:
        with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as ws:
            time.sleep(2.5)  # more than twice --timeout-header 1
            ws.send("still here")
            assert ws.recv(timeout=10) == "echo: still here"
        assert "sweep failed" not in cmd.output and "Traceback" not in cmd.output, cmd.output
    finally:
        cmd.kill_all()


def test_a_pipelined_head_waits_for_the_response_in_progress(tmp_path):
    """The head clock runs only while the server waits on the client: a slow response (2 s here, twice
    the limit) with the start of the next request behind it is answered whole, not cut by
    --timeout-header 1."""
    cmd, port = _start(tmp_path, "--timeout-header", "1", app="tests.apps.star:app")
    try:
        with _connect(port) as sock:
            sock.sendall(b"GET /slow?s=2 HTTP/1.1\r\nHost: x\r\n\r\nGET / HT")
            reply = _read_all(sock)
        assert reply.startswith(b"HTTP/1.1 200 ") and b"slow done" in reply, reply
    finally:
        cmd.kill_all()
