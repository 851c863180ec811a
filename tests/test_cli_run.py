"""`prefork run SCRIPT`: a plain script gets N workers, supervision, reload and control."""

from __future__ import annotations

import re

import httpx
from cli_helpers import ctl_json, free_port, pid_alive, prefork_cmd, run_prefork  # noqa: F401

SCRIPT = """
import os
import sys
from http.server import BaseHTTPRequestHandler

import prefork


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {os.getpid()} args={sys.argv[1:]}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


print("worker script started, worker", prefork.worker.id, "argv0", os.path.basename(sys.argv[0]))
server = prefork.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Hello)
server.serve_forever()
"""


def test_run_script_in_workers_with_control(prefork_cmd, tmp_path):  # noqa: F811
    script = tmp_path / "server.py"
    script.write_text(SCRIPT)
    port = free_port()
    control = str(tmp_path / "c.sock")
    cmd = prefork_cmd("run", "--workers", "2", "--control", control, str(script), str(port), "extra")
    cmd.wait_ready()
    before = set(cmd.track_workers(control))
    assert len(before) == 2
    seen = set()
    for _ in range(20):
        r = httpx.get(f"http://127.0.0.1:{port}/", headers={"Connection": "close"}, timeout=5)
        assert r.status_code == 200 and f"args=['{port}', 'extra']" in r.text
        seen.add(int(r.text.split()[2]))
    assert seen <= before
    # the script's own output carries its worker's id
    assert re.search(
        r"^\[worker [12]\] worker script started, worker [12] argv0 server\.py$", cmd.output, re.M
    )

    assert run_prefork(["ctl", "--control", control, "reload"]).returncode == 0
    cmd.expect("reload done", timeout=30)
    after = set(cmd.track_workers(control))
    assert after - before
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200

    assert run_prefork(["ctl", "--control", control, "stop"]).returncode == 0
    assert cmd.finish() == 0, cmd.output
    for pid in before | after:
        assert not pid_alive(pid)


def test_run_script_that_fails(prefork_cmd, tmp_path):  # noqa: F811
    script = tmp_path / "bad.py"
    script.write_text("raise SystemExit('cannot start: no database')\n")
    cmd = prefork_cmd("run", "--workers", "1", "--control", str(tmp_path / "c.sock"), str(script))
    code = cmd.finish(timeout=40)
    assert code != 0
    assert "cannot start: no database" in cmd.output
