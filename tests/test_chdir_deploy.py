"""--chdir with symlink-swap deploys (Capistrano style): `current -> releases/N`.

A deploy unpacks releases/2, points `current` at it atomically (a symlink under a temporary name,
renamed over `current`), deletes releases/1 and runs `prefork ctl reload`. The workers started by
the reload must run the new release (their working directory, the app's import path, the run
script's path all go through `current` as given, resolved again at each start), and a client
loading the server meanwhile (keep-alive and new connections) must see no error at all (#12).

Before --chdir kept its path as given, a resolved working directory (releases/1) was what each
later start used: once releases/1 was deleted, no new worker could start (Popen's cwd is gone) and
the reload failed with the old release still serving. These tests fail that way if the path is
resolved (os.path.realpath in cli/__init__.py _chdir)."""

from __future__ import annotations

import http.client
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import ctl_json, free_port, pid_alive, prefork_cmd, run_prefork  # noqa: F401

pytestmark = pytest.mark.timeout(90)

ASGI = """
import os

VERSION = {version}
CWD = os.getcwd()  # once, at start: the old release's folder is deleted while its workers drain


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"version {{VERSION}} cwd {{CWD}}".encode()
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]}})
    await send({{"type": "http.response.body", "body": body}})
"""

SCRIPT = """
import os
import sys
from http.server import BaseHTTPRequestHandler

import prefork

VERSION = {version}
CWD = os.getcwd()  # once, at start: the old release's folder is deleted while its workers drain


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = f"version {{VERSION}} cwd {{CWD}}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


prefork.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


class Load:
    """Two client threads: one keep-alive connection reused for every request, and one new
    connection per request. Each request is recorded as (start time, body or error)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.results: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(keep,), daemon=True)
                        for keep in (True, False)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, keep_alive: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        for _ in range(20000):  # bounded, whatever happens
            if self.stop.is_set():
                break
            start = time.monotonic()
            try:
                if not keep_alive:
                    conn.close()
                conn.request("GET", "/", headers={} if keep_alive else {"Connection": "close"})
                response = conn.getresponse()
                body = response.read().decode()
                if response.status != 200:
                    raise AssertionError(f"status {response.status}: {body}")
                with self.lock:
                    self.results.append((start, body))
            except Exception as exc:
                conn.close()
                with self.lock:
                    self.errors.append(f"{'keep-alive' if keep_alive else 'new connection'}: {exc!r}")
            time.sleep(0.002)
        conn.close()

    def count(self) -> int:
        with self.lock:
            return len(self.results)


def _release(root: Path, version: int, mode: str) -> None:
    folder = root / "releases" / str(version)
    folder.mkdir(parents=True)
    if mode == "run":
        (folder / "server.py").write_text(SCRIPT.format(version=version))
    else:
        (folder / "app.py").write_text(ASGI.format(version=version))


def _swap(root: Path, target: str) -> None:
    """Point `current` at `target` atomically: never a moment without it."""
    temp = root / "current.new"
    os.symlink(target, temp)
    os.rename(temp, root / "current")


def _wait_until(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["serve", "serve-preload", "run"])
def test_symlink_swap_deploy_then_reload(prefork_cmd, tmp_path, mode):  # noqa: F811
    root = tmp_path / "site"
    root.mkdir()
    _release(root, 1, mode)
    _release(root, 2, mode)
    os.symlink("releases/1", root / "current")
    port, control = free_port(), str(tmp_path / "c.sock")
    common = ["--chdir", "current", "--workers", "2", "--control", control]
    if mode == "run":
        cmd = prefork_cmd("run", *common, "server.py", str(port), cwd=root)
    else:
        cmd = prefork_cmd("serve", *common, "--bind", f"127.0.0.1:{port}", "app:app", "--lifespan", "off",
                          "--preload" if mode == "serve-preload" else "--no-preload", cwd=root)
    cmd.wait_ready(30)
    old = set(cmd.track_workers(control))

    with Load(port) as load:
        _wait_until(lambda: load.count() >= 20, "the first answers")
        _swap(root, "releases/2")
        shutil.rmtree(root / "releases" / "1")  # the old release is gone for good
        assert run_prefork(["ctl", "--control", control, "reload"]).returncode == 0
        cmd.expect(r"reload (done|failed)", 40)
        assert "reload done" in cmd.output, cmd.output  # a resolved cwd: no new worker could start
        _wait_until(lambda: not any(pid_alive(pid) for pid in old), "the old workers' exit")
        after_old = time.monotonic()  # no worker of release 1 is left: every answer from now is 2's
        _wait_until(lambda: sum(1 for t, _ in list(load.results) if t > after_old) >= 40, "later answers")
    cmd.track_workers(control)

    assert load.errors == [], load.errors[:5]
    later = [body for start, body in load.results if start > after_old]
    assert later and all(body == f"version 2 cwd {root}/releases/2" for body in later), set(later)
    before = [body for start, body in load.results if start <= after_old]
    assert f"version 1 cwd {root}/releases/1" in before  # the load did span the deploy
    assert run_prefork(["ctl", "--control", control, "stop"]).returncode == 0
    assert cmd.finish(30) == 0, cmd.output
