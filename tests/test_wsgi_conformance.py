"""PEP 3333 conformance of the WSGI bridge (src/prefork/http/wsgi.py and its modules), through the
real command on 127.0.0.1: wsgiref.validate.validator over the test apps, wsgi.file_wrapper and
sendfile (with keep-alive after it), wsgi.input streamed (memory bound, readline and friends, a
client that sends less than its Content-Length), SCRIPT_NAME/PATH_INFO with --root-path."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from cli_helpers import ROOT, free_port, prefork_cmd  # noqa: F401


def _load_pattern():
    """The app's byte pattern, loaded by path: importing the `tests` package here would take that name
    from tests/uvicorn_suite, which needs it for uvicorn's own test package."""
    import importlib.util

    path = ROOT / "tests" / "apps" / "wsgi_conformance.py"
    spec = importlib.util.spec_from_file_location("_wsgi_conformance_app", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pattern


pattern = _load_pattern()

APP = "tests.apps.wsgi_conformance:app"


def _serve(prefork_cmd, tmp_path: Path, app: str = APP, *extra: str):  # noqa: F811
    port = free_port()
    control = str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", app, "--workers", "1", "--bind", f"127.0.0.1:{port}", "--control", control,
                      *extra)
    cmd.wait_ready()
    pid = cmd.track_workers(control)[0]
    return cmd, port, pid


def _response(sock: socket.socket, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from `sock` (Content-Length or chunked), leaving the connection usable."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"connection closed in the head: {data!r}"
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    buf = bytearray(rest)

    def need(n: int) -> None:
        while len(buf) < n:
            more = sock.recv(1 << 20)
            assert more, f"connection closed in the body after {len(buf)} bytes"
            buf.extend(more)

    if head_only:
        return status, headers, b""
    if "content-length" in headers:
        n = int(headers["content-length"])
        need(n)
        assert len(buf) == n, "bytes after the body"
        return status, headers, bytes(buf)
    assert headers.get("transfer-encoding") == "chunked", headers
    body = bytearray()
    while True:
        while b"\r\n" not in buf:
            need(len(buf) + 1)
        line, _, tail = bytes(buf).partition(b"\r\n")
        size = int(line, 16)
        buf[:] = tail
        need(size + 2)
        body += buf[:size]
        del buf[:size + 2]
        if size == 0:
            return status, headers, bytes(body)


def _get(sock: socket.socket, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return _response(sock, head_only=method == "HEAD")


def test_file_wrapper_goes_out_with_sendfile_and_keep_alive_goes_on(prefork_cmd, tmp_path):  # noqa: F811
    """A file_wrapper over a regular file with a Content-Length: sent with sendfile (the file's
    read() is never called), from its current position, and the connection serves the next requests.
    Smaller files, no Content-Length, and HEAD go the ordinary way, with the same bytes."""
    cmd, port, _pid = _serve(prefork_cmd, tmp_path)
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        assert _get(s, "/reads")[2] == b"0"
        for size, skip in ((3_000_000, 0), (200_000, 1000), (3_000_000, 0)):
            status, headers, body = _get(s, f"/file?size={size}&skip={skip}")
            assert (status, len(body)) == (200, size - skip)
            assert body == pattern(size)[skip:], "sendfile sent other bytes"
        assert _get(s, "/reads")[2] == b"0", "the file was read into Python: sendfile was not used"
        status, headers, body = _get(s, "/file?size=3000000", "HEAD")
        assert (status, headers["content-length"], body) == (200, "3000000", b"")
        assert _get(s, "/reads")[2] == b"0", "HEAD read the file"
        status, headers, body = _get(s, "/file?size=5000")  # small: read and written at once
        assert (status, body) == (200, pattern(5000))
        status, headers, body = _get(s, "/file?size=300000&length=0")  # no length: chunked blocks
        assert (status, headers.get("transfer-encoding"), body) == (200, "chunked", pattern(300_000))
        assert int(_get(s, "/reads")[2]) > 0
    with httpx.Client(timeout=15) as client:  # many at once, each on its own connection
        results: list[bool] = []

        def fetch() -> None:
            r = client.get(f"http://127.0.0.1:{port}/file?size=1000000")
            results.append(r.content == pattern(1_000_000))

        threads = [threading.Thread(target=fetch) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [True] * 6
    assert "Traceback" not in cmd.output


def test_django_file_response_uses_the_file_wrapper(prefork_cmd, tmp_path):  # noqa: F811
    cmd, port, _pid = _serve(prefork_cmd, tmp_path, "tests.apps.djproj.wsgi:application")
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        for _ in range(2):
            status, headers, body = _get(s, "/file?size=2000000")
            assert (status, headers.get("content-length"), body) == (200, "2000000", pattern(2_000_000))
        assert _get(s, "/")[2].startswith(b"hello from django")


def _status(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS")}  # kB


def test_large_upload_is_streamed_to_the_app(prefork_cmd, tmp_path):  # noqa: F811
    """64 MiB read by the app in 64 KiB blocks: the app starts before the body has all come (it
    reads as it arrives), and the worker's peak RSS grows by far less than the body."""
    cmd, port, pid = _serve(prefork_cmd, tmp_path)
    httpx.post(f"http://127.0.0.1:{port}/upload", content=b"x" * 100, timeout=10)  # warm the path
    before = _status(pid)
    total, block = 64 << 20, bytes(range(256)) * 256  # 64 KiB
    digest = hashlib.sha256(block * (total // len(block))).hexdigest()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {total}\r\n\r\n".encode())
        for _ in range(total // len(block)):
            s.sendall(block)
        status, _headers, body = _response(s)
    assert (status, body.decode()) == (200, f"{total} {digest}")
    after = _status(pid)
    grown_mib = (after["VmHWM"] - before["VmHWM"]) / 1024
    assert grown_mib < 16, f"the worker's peak RSS grew by {grown_mib:.1f} MiB for a 64 MiB body"


@pytest.mark.parametrize("size", [3000, 1_500_000])  # read ahead in memory, and streamed
def test_input_readline_readlines_and_iteration(prefork_cmd, tmp_path, size):  # noqa: F811
    cmd, port, _pid = _serve(prefork_cmd, tmp_path)
    lines = [(b"line %d " % i) + b"y" * (i % 97) + b"\n" for i in range(size // 50)]
    body = b"".join(lines) + b"tail without a newline"
    expected = [*lines, b"tail without a newline"]
    with httpx.Client(timeout=20) as client:
        for how in ("readline", "readlines", "iter"):
            r = client.post(f"http://127.0.0.1:{port}/lines?how={how}", content=body)
            assert r.status_code == 200
            assert [line.encode("latin-1") for line in r.json()] == expected, how
        r = client.post(f"http://127.0.0.1:{port}/lines?how=sized", content=b"abcdefgh\nij\n\nklmnopqrstu")
        assert r.json() == ["abcde", "fgh\n", "ij\n", "\n", "klmno", "pqrst", "u"]


@pytest.mark.parametrize("sent", [50_000, 2_000_000])  # before and after the app started
def test_client_that_sends_less_than_its_content_length(prefork_cmd, tmp_path, sent):  # noqa: F811
    """Silent after part of its body: the app gets what came, then an OSError, within the timeout
    (--timeout-header), and answers. Gone after part of it: nothing hangs, the worker serves on."""
    cmd, port, pid = _serve(prefork_cmd, tmp_path, APP, "--timeout-header", "2")
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 4000000\r\n\r\n" + b"b" * sent)
        status, headers, body = _response(s)
    assert time.monotonic() - start < 15
    assert status == 200 and body.decode().startswith(f"{sent} then ClientDisconnected: "), body
    assert headers.get("connection") == "close"

    with httpx.Client(timeout=10) as client:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:  # this one leaves
            sent += 7  # not the count of the request above: /progress tells this one's
            s.sendall(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 4000000\r\n\r\n" + b"c" * sent)
            deadline = time.monotonic() + 20  # the app has read its whole blocks (small: it never starts)
            blocks = str(sent // 65536 * 65536)  # and waits for the rest of its last one
            # at least: on a loaded machine --timeout-header may pass before a poll sees exactly that
            while sent > 1 << 20 and int(client.get(f"http://127.0.0.1:{port}/progress").text) < int(blocks):
                assert time.monotonic() < deadline, "the app did not read what came"
                time.sleep(0.05)
        if sent > 1 << 20:  # the app was reading: it learns the body ended early (the client left, or
            # went silent for --timeout-header first, on a loaded machine): either way what came, then
            last = client.get(f"http://127.0.0.1:{port}/last").text
            while not last.startswith(f"{sent} then") and time.monotonic() < deadline:
                time.sleep(0.05)
                last = client.get(f"http://127.0.0.1:{port}/last").text
            assert last.startswith(f"{sent} then ClientDisconnected: "), last
        r = client.post(f"http://127.0.0.1:{port}/upload", content=b"z" * 10)
        assert r.text == f"10 {hashlib.sha256(b'z' * 10).hexdigest()}"
    assert cmd.track_workers(str(tmp_path / "ctl.sock")) == [pid]


def _env(port: int, path: str) -> dict[str, object]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        status, _h, body = _get(s, path)
    assert status == 200, (path, body)
    return json.loads(body)


@pytest.mark.parametrize("root", ["/api", "/api/"])
def test_root_path_script_name_and_path_info(prefork_cmd, tmp_path, root):  # noqa: F811
    """--root-path /api: /api/env/users is SCRIPT_NAME /api + PATH_INFO /env/users (gunicorn's and
    PEP 3333's split); /env/users (a proxy stripped the prefix, what uvicorn's root_path assumes)
    gives the same; /apix is outside the root path. Through the validator, so both stay valid."""
    cmd, port, _pid = _serve(prefork_cmd, tmp_path, "tests.apps.validated:conformance", "--interface", "wsgi",
                             "--root-path", root)
    for path in ("/api/env/users", "/env/users"):
        got = _env(port, path + "?a=1")
        assert (got["SCRIPT_NAME"], got["PATH_INFO"], got["QUERY_STRING"]) == ("/api", "/env/users", "a=1")
    got = _env(port, "/api")
    assert (got["SCRIPT_NAME"], got["PATH_INFO"]) == ("/api", "")
    got = _env(port, "/api/env/caf%C3%A9%FF%2Fx")  # %-decoded, its bytes as latin-1 (PEP 3333)
    assert got["PATH_INFO"] == "/env/caf\xc3\xa9\xff/x"
    got = _env(port, "/envx/api")  # outside /api: taken as already stripped
    assert (got["SCRIPT_NAME"], got["PATH_INFO"]) == ("/api", "/envx/api")
    assert "AssertionError" not in cmd.output


def test_no_root_path(prefork_cmd, tmp_path):  # noqa: F811
    cmd, port, _pid = _serve(prefork_cmd, tmp_path)
    got = _env(port, "/env/a%20b")
    assert got == {"SCRIPT_NAME": "", "PATH_INFO": "/env/a b", "QUERY_STRING": "",
                   "wsgi.input_terminated": True}


# -- wsgiref.validate over the bridge ----------------------------------------------------------------

BIG = bytes(range(256)) * 8192  # 2 MiB: read past what the bridge reads ahead

CASES = {
    "cases": [("GET", "/?a=1", None, 200), ("HEAD", "/", None, 200), ("GET", "/stream", None, 200),
              ("GET", "/write", None, 200), ("GET", "/closing", None, 200), ("GET", "/exc-info", None, 503),
              ("GET", "/boom", None, 500), ("GET", "/boom-late", None, 500), ("GET", "/", None, 200)],
    "conformance": [("POST", "/upload", b"x" * 1000, 200), ("POST", "/upload", BIG, 200),
                    ("POST", "/lines?how=readline", b"a\nb\n", 200),
                    ("POST", "/lines?how=readlines", BIG, 200),
                    ("POST", "/lines?how=iter", BIG, 200), ("GET", "/file?size=300000", None, 200),
                    ("HEAD", "/file?size=300000", None, 200), ("GET", "/env", None, 200),
                    ("GET", "/boom", None, 500)],
    "flask": [("GET", "/", None, 200), ("HEAD", "/", None, 200), ("POST", "/echo", b"hello", 200),
              ("POST", "/echo", BIG, 200), ("GET", "/missing", None, 404)],
    "django": [("GET", "/", None, 200), ("HEAD", "/", None, 200), ("POST", "/echo", b"hello", 200),
               ("POST", "/echo", BIG, 200), ("GET", "/file?size=300000", None, 200),
               ("GET", "/missing", None, 404)],
}


@pytest.mark.parametrize("name", list(CASES))
def test_wsgiref_validator_finds_nothing(prefork_cmd, tmp_path, name):  # noqa: F811
    """Each app wrapped in wsgiref.validate.validator (tests/apps/validated.py): GET, HEAD, POST
    with small and streamed bodies, streamed responses, write(), file_wrapper, errors. A breach of
    PEP 3333 by the bridge is an AssertionError in the worker (a 500 and a traceback in the log)."""
    cmd, port, _pid = _serve(prefork_cmd, tmp_path, f"tests.apps.validated:{name}", "--interface", "wsgi")
    with httpx.Client(timeout=20) as client:
        for method, path, body, expected in CASES[name]:
            r = client.request(method, f"http://127.0.0.1:{port}{path}", content=body)
            assert r.status_code == expected, (method, path, r.text[:300], cmd.output[-3000:])
            if path == "/echo":
                assert r.content == body
    for word in ("AssertionError", "WSGIWarning", "garbage collected without being closed"):
        assert word not in cmd.output, cmd.output[-3000:]


def test_file_wrapper_over_tls_is_read_not_sendfiled(prefork_cmd, tmp_path):  # noqa: F811
    """sendfile would write the file's plain bytes into the TLS stream: over TLS it is read in blocks."""
    from test_serve_tls import _cert

    cert, key = _cert(tmp_path)
    cmd, port, _pid = _serve(prefork_cmd, tmp_path, APP, "--certfile", str(cert), "--keyfile", str(key))
    with httpx.Client(timeout=15, verify=False) as client:
        for _ in range(2):
            r = client.get(f"https://127.0.0.1:{port}/file?size=1000000")
            assert (r.status_code, r.content == pattern(1_000_000)) == (200, True)
        assert int(client.get(f"https://127.0.0.1:{port}/reads").text) > 0


def test_sendfile_to_a_client_that_stops_reading(prefork_cmd, tmp_path):  # noqa: F811
    """A client that reads nothing of a large sendfile response: after --timeout-header seconds
    without progress the connection is closed and the app's thread is free; the worker serves on."""
    from cli_helpers import ctl_json

    cmd, port, pid = _serve(prefork_cmd, tmp_path, APP, "--timeout-header", "1")
    size = 32 << 20
    httpx.get(f"http://127.0.0.1:{port}/file?size={size}&skip={size - 70000}", timeout=20)  # makes the file
    control = str(tmp_path / "ctl.sock")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET /file?size={size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        deadline = time.monotonic() + 20
        for state in (1, 0):  # the request runs, then ends although the client read nothing
            while ctl_json(control)["workers"][0].get("in_flight") != state:
                assert time.monotonic() < deadline, f"in flight never {state}: a thread hangs on the client"
                time.sleep(0.1)
        s.settimeout(10)
        got = 0
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            got += len(data)
        assert got < size, "the whole file went to a client that did not read"
    r = httpx.get(f"http://127.0.0.1:{port}/file?size=200000", timeout=10)
    assert r.content == pattern(200_000)
    assert cmd.track_workers(control) == [pid]
