"""The WSGI bridge of `prefork serve` (src/prefork/http/wsgi.py), through the real command and HTTP:
gathered and streamed responses, write(), wsgi.input, exc_info, close() of the app's iterable,
errors -> 500 with the worker living on, HEAD, and the --threads limit."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import httpx
import pytest
from cli_helpers import ctl_json, free_port, prefork_cmd  # noqa: F401

APP = "tests.apps.wsgi_cases:app"


def _serve(prefork_cmd, tmp_path: Path, *extra: str):  # noqa: F811
    port = free_port()
    control = str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", APP, "--workers", "1", "--bind", f"127.0.0.1:{port}", "--control", control,
                      *extra)
    cmd.wait_ready()
    cmd.track_workers(control)
    return cmd, f"http://127.0.0.1:{port}", control


def _raw(port_url: str, request: bytes) -> bytes:
    host, port = port_url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(request)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def test_wsgi_bridge_behaviours(prefork_cmd, tmp_path):  # noqa: F811
    cmd, url, control = _serve(prefork_cmd, tmp_path)
    pid = cmd.track_workers(control)[0]
    with httpx.Client(timeout=10) as client:
        r = client.get(f"{url}/?a=1&b=%20")
        assert (r.status_code, r.text, r.headers["x-query"]) == (200, "hello world\n", "a=1&b=%20")

        r = client.get(f"{url}/stream")  # bigger than what is gathered: streamed, chunked
        assert r.status_code == 200 and r.headers.get("transfer-encoding") == "chunked"
        assert r.content == b"".join(bytes([65 + i]) * 100_000 for i in range(8))

        r = client.get(f"{url}/write")
        assert (r.status_code, r.text) == (200, "one,two,three")

        for size in (0, 10, 3 << 20):  # in memory, and spooled to disk past 1 MiB
            body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            r = client.post(f"{url}/echo", content=body)
            assert r.status_code == 200 and r.content == body

        before = int(client.get(f"{url}/closed").text)
        for _ in range(3):
            assert client.get(f"{url}/closing").text == "ab"
        assert int(client.get(f"{url}/closed").text) == before + 3

        r = client.get(f"{url}/exc-info")  # start_response again with exc_info before any body
        assert (r.status_code, r.text) == (503, "sorry")

        r = client.head(f"{url}/")
        assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "12"

    for path in ("/boom", "/boom-late", "/boom", "/boom-late"):  # app errors: 500, the worker serves on
        r = httpx.get(f"{url}{path}", timeout=10)
        assert r.status_code == 500
    # an error after the response started: the connection is cut, not a 500 after a 200
    raw = _raw(url, b"GET /boom-streamed HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200") and not raw.endswith(b"0\r\n\r\n")
    assert httpx.get(f"{url}/", timeout=10).text == "hello world\n"
    assert cmd.track_workers(control) == [pid]
    assert "boom in the app" in cmd.output


def test_wsgi_threads_limit(prefork_cmd, tmp_path):  # noqa: F811
    cmd, url, control = _serve(prefork_cmd, tmp_path, "--threads", "2")
    results: list[int] = []

    def call() -> None:
        results.append(httpx.get(f"{url}/sleep", timeout=15).status_code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == [200] * 6
    assert httpx.get(f"{url}/max-running", timeout=5).text == "2"
    assert ctl_json(control)["workers"]


@pytest.mark.parametrize("header_map", ["drop", "refuse", "dangerous"])
def test_underscore_headers_cannot_pass_for_a_proxys(prefork_cmd, tmp_path, header_map):  # noqa: F811
    """X_Remote_User and X-Remote-User both map to HTTP_X_REMOTE_USER: a client's underscore header
    must not pass for the one a proxy sets (gunicorn 22's rule). --header-map chooses: drop it (the
    default), refuse the request, or keep it (dangerous)."""
    extra = () if header_map == "drop" else ("--header-map", header_map)
    cmd, url, control = _serve(prefork_cmd, tmp_path, *extra)
    try:
        proxy = httpx.get(f"{url}/user", headers={"X-Remote-User": "alice"}, timeout=10)
        assert (proxy.status_code, proxy.text) == (200, "'alice'")
        spoof = httpx.get(f"{url}/user", headers={"X_Remote_User": "admin"}, timeout=10)
        both = _raw(url, b"GET /user HTTP/1.1\r\nHost: x\r\nX_Remote_User: admin\r\n"
                         b"X-Remote-User: alice\r\nConnection: close\r\n\r\n")
        if header_map == "drop":
            assert (spoof.status_code, spoof.text) == (200, "None")
            assert b"'alice'" in both and b"admin" not in both, both
        elif header_map == "refuse":
            assert spoof.status_code == 400
            assert both.startswith(b"HTTP/1.1 400 "), both
        else:
            assert (spoof.status_code, spoof.text) == (200, "'admin'")
            assert b"admin" in both, both
    finally:
        cmd.proc.terminate()
        assert cmd.finish() == 0
