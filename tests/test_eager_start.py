"""Each request's task starts eagerly on Python 3.12+ (src/prefork/http/eager.py), as a real task, and
pipelined requests are still answered in order; on 3.10 and 3.11 the task is scheduled as uvicorn does."""

from __future__ import annotations

import json
import socket
import sys

import pytest
from cli_helpers import free_port, prefork_cmd  # noqa: F401

pytestmark = pytest.mark.timeout(60)
EAGER = sys.version_info >= (3, 12)


def _responses(sock: socket.socket, count: int) -> list[dict]:
    data, out = b"", []
    while len(out) < count:
        chunk = sock.recv(65536)
        assert chunk, (data, out)
        data += chunk
        while b"\r\n\r\n" in data:
            head, rest = data.split(b"\r\n\r\n", 1)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(rest) < length:
                break
            out.append(json.loads(rest[:length]))
            data = rest[length:]
    return out


def test_first_step_runs_in_data_received_as_the_current_task(prefork_cmd, tmp_path):  # noqa: F811
    port = free_port()
    cmd = prefork_cmd("serve", "tests.apps.eagerprobe:app", "--workers", "1", "--bind", f"127.0.0.1:{port}",
                      "--control", str(tmp_path / "ctl.sock"))
    cmd.wait_ready(30)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        (one,) = _responses(sock, 1)
        assert one == {"eager": EAGER, "task": True, "same": True, "path": "/one"}
        # pipelined: a waiting one, then two that answer at once; the answers keep the order
        sock.sendall(b"".join(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in (b"wait", b"a", b"b")))
        got = _responses(sock, 3)
    assert [r["path"] for r in got] == ["/wait", "/a", "/b"], got
    assert all(r["task"] and r["same"] for r in got), got
