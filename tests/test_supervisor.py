"""Fault injection against the Supervisor, with real processes and real HTTP on 127.0.0.1.

Each test runs a supervised cluster script (see APP), injects a fault (SIGKILL, SIGSTOP, a crashing
app, SIGHUP or SIGTERM under load) and checks what clients and the process table see.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import threading
import time

import pytest
from cli_helpers import free_port
from conftest import pid_alive, wait_until

APP = '''
import os, sys
import prefork as cluster
from http.server import BaseHTTPRequestHandler

if cluster.is_primary:
    timeout = float(os.environ.get("TIMEOUT", "0")) or None
    max_memory = int(os.environ.get("MAX_MEMORY", "0")) or None
    sup = cluster.supervise(int(os.environ.get("N", "2")), timeout=timeout, graceful_timeout=5,
                            max_memory=max_memory)
    @cluster.on("listening")
    def up(worker, address):
        print(f"listening {worker.id} {worker.process.pid} {address.port}", flush=True)
    sys.exit(sup.wait())
else:
    if os.environ.get("CRASH"):
        with open(os.environ["BOOTS"], "a") as f:
            f.write("boot\\n")
        import no_such_module_here  # noqa
    version = open(os.environ["VERSION_FILE"]).read().strip() if os.environ.get("VERSION_FILE") else "v1"
    hog = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if self.path == "/grow":
                hog.append(b"x" * (80 << 20))  # touched pages: RSS grows by 80 MiB
            body = f"{version} {cluster.worker.id}\\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    cluster.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''


def get(port: int, conn: http.client.HTTPConnection | None = None) -> str:
    """One GET; on a keep-alive connection if given (it reconnects after a `Connection: close`)."""
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", "/", headers={} if conn else {"Connection": "close"})
        return c.getresponse().read().decode()
    finally:
        if conn is None:
            c.close()


class Load:
    """Client threads, half on keep-alive connections and half opening one per request."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.ok = 0
        self.errors: list[str] = []
        self.bodies: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i % 2 == 0,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _run(self, keep_alive: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5) if keep_alive else None
        while not self._stop.is_set():
            try:
                body = get(self.port, conn)
                with self._lock:
                    self.ok += 1
                    self.bodies.append((time.monotonic(), body))
            except Exception as exc:  # counted: a test asserts there are none
                with self._lock:
                    self.errors.append(f"{'keep-alive' if keep_alive else 'fresh'}: {exc!r}")
                if conn is not None:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            time.sleep(0.002)


def start(py, n: int = 2, **env: str):
    port = free_port()
    script = py.spawn(APP, env={"PORT": str(port), "N": str(n), **env})
    pids = []
    for _ in range(n):
        m = script.expect(r"listening (\d+) (\d+) (\d+)", timeout=20, start=len(pids))
        pids.append(int(m[2]))
    script.track(*pids)
    return script, port, pids


def listening_pids(script) -> list[int]:
    return [int(m[1]) for m in re.finditer(r"listening \d+ (\d+)", script.stdout)]


def test_sigkilled_worker_is_replaced_and_service_goes_on(py):
    script, port, pids = start(py)
    with Load(port) as load:
        time.sleep(0.5)
        os.kill(pids[0], signal.SIGKILL)
        assert wait_until(lambda: len(listening_pids(script)) == 3, 10), script.stdout
        time.sleep(0.5)
        before = load.ok
        time.sleep(0.5)
        assert load.ok > before  # still serving after the replacement
    new = listening_pids(script)[2]
    script.track(new)
    assert pid_alive(new) and not pid_alive(pids[0])
    assert len(load.errors) <= 4, load.errors  # at most the requests in flight on the killed worker
    assert "died (signal SIGKILL)" in script.stderr
    script.signal("SIGTERM")
    assert script.wait(15) == 0


def test_crash_loop_backs_off_then_gives_up_naming_the_error_once(py, tmp_path):
    boots = tmp_path / "boots"
    script = py.spawn(APP, env={"PORT": str(free_port()), "N": "1", "CRASH": "1", "BOOTS": str(boots)})
    t0 = time.monotonic()
    code = script.wait(30)
    elapsed = time.monotonic() - t0
    assert code == 3, script.stderr
    assert boots.read_text().count("boot") == 5  # GIVE_UP_AFTER boots, no more
    assert elapsed > 0.1 + 0.2 + 0.4  # the back-off delays between them
    assert script.stderr.count("Traceback") == 1, script.stderr  # the traceback once, not a wall
    assert "giving up: workers cannot boot" in script.stderr
    assert "No module named 'no_such_module_here'" in script.stderr.splitlines()[-1]


def test_stopped_worker_is_killed_and_replaced_after_timeout(py):
    script, port, pids = start(py, n=1, TIMEOUT="1.5")
    os.kill(pids[0], signal.SIGSTOP)
    try:
        assert wait_until(lambda: len(listening_pids(script)) == 2, 10), script.stderr
    finally:
        if pid_alive(pids[0]):
            os.kill(pids[0], signal.SIGCONT)
    new = listening_pids(script)[1]
    script.track(new)
    assert "did not answer" in script.stderr
    assert wait_until(lambda: not pid_alive(pids[0]), 5)
    assert get(port).startswith("v1")
    script.signal("SIGTERM")
    assert script.wait(15) == 0


def test_reload_under_load_has_no_errors_and_serves_new_code(py, tmp_path):
    version = tmp_path / "version"
    version.write_text("v1")
    script, port, pids = start(py, VERSION_FILE=str(version))
    with Load(port, threads=6) as load:
        time.sleep(0.5)
        version.write_text("v2")
        reloaded = time.monotonic()
        script.signal("SIGHUP")
        assert wait_until(lambda: "reload done" in script.stderr, 20), script.stderr
        assert wait_until(lambda: sum(not pid_alive(p) for p in pids) == 2, 10)
        time.sleep(0.5)
    script.track(*listening_pids(script))
    assert load.errors == [], load.errors[:5]
    assert load.ok > 50
    late = [body for t, body in load.bodies if t > reloaded + 3]
    assert get(port).startswith("v2")
    assert all(body.startswith("v2") for body in late[-20:]), late[-20:]
    script.signal("SIGTERM")
    assert script.wait(15) == 0


def test_sigterm_under_load_drains_and_exits_0_leaving_no_process(py):
    script, port, pids = start(py)
    with Load(port, threads=4) as load:
        time.sleep(0.5)
        script.signal("SIGTERM")
        code = script.wait(15)
    assert code == 0, script.stderr
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 5)
    # Requests that had started were answered; after the stop only refused connections remain
    # (none reset: tests/test_stop_no_reset.py).
    assert all("ConnectionRefused" in e for e in load.errors), load.errors[:5]


@pytest.mark.parametrize("signame,expected", [("SIGTTIN", 3), ("SIGTTOU", 1)])
def test_ttin_ttou_scale(py, signame, expected):
    script, port, pids = start(py)
    script.signal(signame)
    assert wait_until(lambda: f"scaling from 2 to {expected}" in script.stderr, 10), script.stderr
    if expected == 3:
        script.expect(r"listening (\d+) (\d+) (\d+)", timeout=20, start=2)
    else:
        assert wait_until(lambda: sum(pid_alive(p) for p in pids) == 1, 10)
    script.track(*listening_pids(script))
    script.signal("SIGTERM")
    assert script.wait(15) == 0


def test_worker_over_max_memory_is_replaced_gracefully(py):
    script, port, pids = start(py, n=1, MAX_MEMORY=str(60 << 20))
    with Load(port, threads=2) as load:
        time.sleep(0.3)
        assert get(port).startswith("v1")
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/grow", headers={"Connection": "close"})
        assert c.getresponse().status == 200
        c.close()
        assert wait_until(lambda: len(listening_pids(script)) == 2, 15), script.stderr
        assert wait_until(lambda: not pid_alive(pids[0]), 10)
        time.sleep(0.3)
    script.track(*listening_pids(script))
    assert re.search(r"worker 1 \(pid \d+\) uses \d+ MiB of its own \(USS; max 60 MiB\): replacing it",
                     script.stderr)
    assert load.errors == [], load.errors[:5]
    script.signal("SIGTERM")
    assert script.wait(15) == 0


CLOSED_LOOP = r"""
import asyncio, sys
import prefork as cluster

if cluster.is_primary:
    cluster.on("listening", lambda w, a: print("listening", w.process.pid, flush=True))
    sys.exit(cluster.supervise(1, timeout=1.0).wait())
else:
    loop = asyncio.new_event_loop()
    loop.close()  # a serving loop that has ended, as at the end of a drain
    from prefork import _role
    _role.child.heartbeat_responder = lambda pong: loop.call_soon_threadsafe(pong)
    listener = cluster.listen(("127.0.0.1", 0))
    import threading
    threading.Event().wait()
"""


def test_heartbeat_is_answered_when_the_serving_loop_has_ended(py):
    """The channel's thread answers instead, and survives: the worker is not killed as hung."""
    script = py.spawn(CLOSED_LOOP)
    pid = int(script.expect(r"listening (\d+)")[1])
    script.track(pid)
    time.sleep(2.5)  # two heartbeat timeouts: a worker whose beats stop is killed after 1 s + a beat (0.25 s)
    assert pid_alive(pid), script.stderr
    assert "did not answer" not in script.stderr and "Traceback" not in script.stderr, script.stderr
    script.signal("SIGTERM")
    assert script.wait(15) == 0


READY_MESSAGE = r"""
import sys, time
import prefork as cluster

if cluster.is_primary:
    sys.exit(cluster.supervise(2, ready="message", reload_batch=2, graceful_timeout=5).wait())
else:
    listener = cluster.listen(("127.0.0.1", 0))  # listening is not enough: the app says when
    time.sleep(0.5)
    print(f"worker {cluster.worker.id} sends ready", file=sys.stderr, flush=True)
    cluster.worker.send("ready")
    try:
        while True:
            listener.accept()[0].close()
    except OSError:
        pass
"""


def test_ready_message_and_reload_in_batches(py):
    """ready="message" waits for the app's own "ready" (PM2's wait_ready); reload_batch=2 starts two
    new workers, and only once both are ready drains the two old ones."""
    script = py.spawn(READY_MESSAGE)
    assert wait_until(lambda: script.stderr.count("is ready") == 2, 10), script.stderr
    log = script.stderr
    for wid in (1, 2):  # the supervisor's line comes after the worker's own word, not at listen()
        assert log.index(f"worker {wid} sends ready") < log.index(f"worker {wid} (pid"), log
    script.signal("SIGHUP")
    assert wait_until(lambda: script.stderr.count("stopped (reload)") == 2, 15), script.stderr
    log = script.stderr
    reload_at = log.index("reloading")
    new_ready = max(log.index(f"worker {wid} (pid", reload_at) for wid in (3, 4))
    old_stopped = min(log.index(f"worker {wid} (pid", reload_at) for wid in (1, 2))
    assert new_ready < old_stopped, log  # both new ones ready before an old one is drained
    script.signal("SIGTERM")
    assert script.wait(15) == 0
