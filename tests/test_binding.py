"""Binding a unix socket path: only a stale socket file is replaced, never a file of another kind.

A worker's `prefork.listen(path)` makes the primary bind, so whatever the primary would delete on
a worker's word is at stake; `prefork serve --bind unix:PATH` goes the same way.
"""

from __future__ import annotations

import errno
import socket

import pytest
from cli_helpers import free_port, prefork_cmd  # noqa: F401

LISTEN_ONCE = r"""
import os, socket
import prefork as cluster

PATH = os.environ["T_PATH"]
if cluster.is_primary:
    cluster.fork()
else:
    try:
        listener = cluster.listen(PATH)
    except OSError as exc:
        print("error", exc.errno, exc.strerror, flush=True)
        raise SystemExit(0)
    print("listening", flush=True)
    conn, _ = listener.accept()
    conn.sendall(b"served")
    conn.close()
    listener.close()
"""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("policy", ["rr", "none"])
def test_listen_leaves_a_regular_file_alone(py, tmp_path, policy):
    path = tmp_path / "data.txt"
    path.write_text("precious\n")
    result = py.run(LISTEN_ONCE, env={"T_PATH": str(path), "PREFORK_SCHED_POLICY": policy})
    assert result.returncode == 0, result
    assert f"error {errno.EADDRINUSE} " in result.stdout, result
    assert "not a socket" in result.stdout, result
    assert str(path) in result.stdout, result
    assert path.read_text() == "precious\n"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("policy", ["rr", "none"])
def test_listen_replaces_a_stale_socket(py, tmp_path, policy):
    path = tmp_path / "stale.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()  # the file stays, nobody listens on it
    assert path.is_socket()
    script = py.spawn(LISTEN_ONCE, env={"T_PATH": str(path), "PREFORK_SCHED_POLICY": policy})
    script.expect(r"^listening")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(path))
        assert client.recv(100) == b"served"
    assert script.finish(timeout=15).returncode == 0


@pytest.mark.timeout(60)
def test_serve_refuses_a_regular_file(prefork_cmd, tmp_path):  # noqa: F811
    path = tmp_path / "app.sock"
    path.write_text("not a socket\n")
    cmd = prefork_cmd("serve", "tests.apps.hello:asgi", "--workers", "1", "--bind", f"unix:{path}",
                      "--control", str(tmp_path / "ctl.sock"))
    code = cmd.finish(timeout=45)
    assert code != 0, cmd.output
    assert path.read_text() == "not a socket\n"
    lines = [line for line in cmd.output.splitlines() if str(path) in line and "not a socket" in line]
    assert lines, cmd.output
    assert "Traceback" not in cmd.output, cmd.output
