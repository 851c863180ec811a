"""Faults an operator meets, against the real `prefork` command (issue: fault tolerance).

- a closed log pipe must not stop the primary (it silences that stream and keeps serving);
- a worker killed while its replacement boots must not leave two workers in its slot;
- a reload whose worker cannot even be started fails alone: the ready workers keep serving.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import httpx
from cli_helpers import PREFORK, clean_env, ctl_json, free_port, pid_alive, prefork_cmd, run_prefork  # noqa: F401
from conftest import children, end_processes, wait_until

HELLO = os.path.join(os.path.dirname(__file__), "apps", "hello.py")

SLOW_BOOT = """
import sys, time
import prefork
from http.server import BaseHTTPRequestHandler

class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hi\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

time.sleep(float(sys.argv[2]))  # a worker that takes a while to boot
prefork.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Hello).serve_forever()
"""


def status_settled(control: str, n: int) -> bool:
    status = ctl_json(control)
    ready = [w for w in status["workers"] if w["state"] == "ready"]
    return len(status["workers"]) == n and len(ready) == n and status["reload"]["state"] != "running"


def test_closed_log_pipe_neither_hangs_nor_stops_the_primary(tmp_path):
    """`prefork serve app 2>&1 | head -5`, then a worker crash (which logs): the primary keeps
    serving and answering `ctl`, replaces the worker, and stops on SIGTERM."""
    port, control = free_port(), str(tmp_path / "c.sock")
    proc = subprocess.Popen([PREFORK, "serve", "hello:asgi", "--bind", f"127.0.0.1:{port}", "--workers", "2",
                             "--control", control], cwd=os.path.dirname(HELLO), env=clean_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        for _ in range(40):  # as `head` does: read the first lines, then go away
            if b"ready:" in proc.stdout.readline():
                break
        proc.stdout.close()
        pids = [w["pid"] for w in ctl_json(control)["workers"]]
        os.kill(pids[0], signal.SIGKILL)  # the primary logs this: its first write to a closed pipe
        assert wait_until(lambda: status_settled(control, 2) and pids[0] not in
                          {w["pid"] for w in ctl_json(control)["workers"]}, 15)
        pids += [w["pid"] for w in ctl_json(control)["workers"]]
        for _ in range(20):
            assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text == "hello world\n"
        started = time.monotonic()
        assert run_prefork(["ctl", "--control", control, "status"], timeout=5).returncode == 0
        assert time.monotonic() - started < 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not any(pid_alive(p) for p in pids)
    finally:
        end_processes(proc, pids)


BOOT = 1.5  # seconds a worker of SLOW_BOOT sleeps before it listens: the test kills within it


def test_worker_killed_while_its_replacement_boots_leaves_one_worker(prefork_cmd, tmp_path):  # noqa: F811
    script = tmp_path / "slow.py"
    script.write_text(SLOW_BOOT)
    port, control = free_port(), str(tmp_path / "c.sock")
    cmd = prefork_cmd("run", "--workers", "1", "--control", control, str(script), str(port), str(BOOT))
    cmd.wait_ready(30)
    old = cmd.track_workers(control)[0]
    assert run_prefork(["ctl", "--control", control, "reload"]).returncode == 0
    assert wait_until(lambda: len(ctl_json(control)["workers"]) == 2, 10)  # the replacement boots
    cmd.track_workers(control)
    os.kill(old, signal.SIGKILL)
    assert wait_until(lambda: status_settled(control, 1), 20), ctl_json(control)
    time.sleep(BOOT + 0.5)  # a respawn would have booted by now
    assert len(children(cmd.proc.pid)) == 1, (children(cmd.proc.pid), ctl_json(control))
    first = cmd.track_workers(control)[0]
    assert run_prefork(["ctl", "--control", control, "reload"]).returncode == 0  # the slot reloads again
    assert wait_until(lambda: status_settled(control, 1) and cmd.track_workers(control)[0] != first, 20)
    assert wait_until(lambda: len(children(cmd.proc.pid)) == 1, 10), children(cmd.proc.pid)
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text == "hi\n"


def test_reload_that_cannot_start_a_worker_keeps_the_old_ones(prefork_cmd, tmp_path):  # noqa: F811
    """A deploy tool removes the release folder serve runs from, then `ctl reload`: the reload
    fails, once, and says so in `ctl status`; the ready workers go on serving."""
    release = tmp_path / "release"
    release.mkdir()
    shutil.copy(HELLO, release / "hello.py")
    port, control = free_port(), str(tmp_path / "c.sock")
    cmd = prefork_cmd("serve", "hello:asgi", "--bind", f"127.0.0.1:{port}", "--workers", "2",
                      "--control", control, cwd=release)
    cmd.wait_ready(30)
    pids = cmd.track_workers(control)
    release.rename(tmp_path / "gone")
    assert run_prefork(["ctl", "--control", control, "reload"]).returncode == 0
    assert wait_until(lambda: ctl_json(control)["reload"]["state"] == "failed", 15), ctl_json(control)
    time.sleep(1.0)
    status = ctl_json(control)
    assert cmd.proc.poll() is None, cmd.output
    assert sorted(w["pid"] for w in status["workers"]) == sorted(pids), status
    assert all(w["state"] == "ready" for w in status["workers"])
    assert status["last_error"], status
    table = run_prefork(["ctl", "--control", control, "status"]).stdout
    assert "reload failed" in table and "last error" in table, table
    for _ in range(10):
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text == "hello world\n"
    assert cmd.output.count("reload failed") == 1, cmd.output


def test_a_primary_whose_loop_dies_exits_at_once_with_its_workers(py):
    """Whatever ends the loop thread, the primary must not live on deaf: it kills its workers
    and exits non-zero (an outside supervisor then restarts it)."""
    script = py.spawn("""
        import threading, time
        import prefork as cluster
        if cluster.is_primary:
            worker = cluster.fork()
            print("worker", worker.process.pid, flush=True)
            try:
                from prefork import _role
                primary = _role.primary
            except ImportError:  # the layout before _role.py
                primary = cluster._primary
            time.sleep(0.5)
            primary.post(primary.loop.selector.close)  # its next select() raises
            threading.Event().wait()
        else:
            cluster.listen(("127.0.0.1", 0))
            threading.Event().wait()
    """)
    pid = int(script.expect(r"worker (\d+)")[1])
    script.track(pid)
    result = script.finish(timeout=10)
    assert result.returncode == 70, result
    assert wait_until(lambda: not pid_alive(pid), 5)


def test_signals_are_acted_on_while_the_main_thread_is_busy_in_c(py):
    """A signal handler only wakes the primary's loop, which acts: SIGTTIN adds a worker at once
    even while the main thread is inside one long C call (Python-level handlers would wait)."""
    script = py.spawn("""
        import hashlib, os
        import prefork as cluster
        if cluster.is_primary:
            cluster.on("listening", lambda worker, address: print("listening", worker.id, flush=True))
            sup = cluster.supervise(1)
            print("busy", flush=True)
            hashlib.pbkdf2_hmac("sha256", b"x", b"y", 200_000_000)  # a minute or more, in C
        else:
            import threading
            cluster.listen(("127.0.0.1", 0))
            threading.Event().wait()
    """)
    script.expect(r"listening 1", timeout=20)
    script.expect(r"busy")
    script.signal("SIGTTIN")
    script.expect(r"listening 2", timeout=10)


def test_a_worker_that_hangs_while_draining_is_killed_after_timeout(py):
    """Scaled down while stopped (SIGSTOP), a worker cannot drain: the heartbeat finds it after
    `timeout` (not `graceful_timeout`), and under rr what waited in its link is served by the other."""
    script = py.spawn("""
        import socket, sys
        import prefork as cluster
        if cluster.is_primary:
            cluster.on("listening", lambda w, a: print("listening", w.id, w.process.pid, a.port, flush=True))
            cluster.on("exit", lambda w, code, sig: print("exit", w.id, sig, flush=True))
            sys.exit(cluster.supervise(2, timeout=1.0, graceful_timeout=60).wait())
        else:
            with cluster.listen(("127.0.0.1", 0)) as listener:
                while True:
                    conn, _ = listener.accept()
                    conn.sendall(str(cluster.worker.id).encode())
                    conn.close()
    """)
    first = script.expect(r"listening (\d+) (\d+) (\d+)", timeout=20)
    second = script.expect(r"listening (\d+) (\d+) (\d+)", timeout=20, start=1)
    workers = {int(first[1]): int(first[2]), int(second[1]): int(second[2])}
    script.track(*workers.values())
    port = int(first[3])
    os.kill(workers[2], signal.SIGSTOP)  # slot 2 is the one a scale-down removes
    early = []
    try:
        # rr hands every other one of these to the stopped worker: they wait in its link
        early = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
        script.signal("SIGTTOU")
        answers = [conn.recv(16) for conn in early]
        for _ in range(6):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                answers.append(conn.recv(16))
        assert answers == [b"1"] * 10, answers
        script.expect(r"exit 2 SIGKILL", timeout=8)  # timeout 1 s, graceful_timeout 60 s
    finally:
        for conn in early:
            conn.close()
        try:
            os.kill(workers[2], signal.SIGCONT)
        except ProcessLookupError:
            pass
