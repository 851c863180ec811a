"""Shared ports, for every scheduling policy, with real processes and real sockets on 127.0.0.1.

Each test runs a cluster script (the `py` fixture of conftest.py) whose workers serve a tiny protocol:
on each connection a worker writes its id and closes. The test is the client.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import threading
import time
from collections import Counter

import pytest
from conftest import wait_until

POLICIES = ["rr", "none", "reuseport", "least_conn"]

# T_POLICY_ATTR sets cluster.scheduling_policy before forking (the other way to choose it than the
# environment); T_ADDR is the address to listen on; T_DELAY slows each answer so that concurrent
# clients spread over the workers whatever the kernel prefers.
SERVER = r"""
import ast, os, sys, time
import prefork as cluster

if os.environ.get("T_POLICY_ATTR"):
    cluster.scheduling_policy = os.environ["T_POLICY_ATTR"]
ADDR = ast.literal_eval(os.environ["T_ADDR"])
DELAY = float(os.environ.get("T_DELAY", "0"))

if cluster.is_primary:
    @cluster.on("listening")
    def on_listening(worker, address):
        print("listening", worker.id, worker.process.pid, address.address, address.port,
              address.address_type, flush=True)
    for _ in range(int(os.environ.get("T_WORKERS", "2"))):
        cluster.fork()
else:
    import select, socket
    class Mine(socket.socket):
        pass
    listener = cluster.listen(ADDR)
    while True:
        if os.environ.get("T_ACCEPT_SOCKET"):  # the address-less, non-blocking way, into a class
            select.select([listener], [], [])
            try:
                conn = listener.accept_socket(Mine)
            except BlockingIOError:
                continue
            conn.sendall(f"{type(conn).__name__} {conn.getpeername()[1]}".encode())
            conn.close()
            continue
        conn, _ = listener.accept()
        if DELAY:
            time.sleep(DELAY)
        conn.sendall(str(cluster.worker.id).encode())
        conn.close()
"""


def _env(policy: str, addr: object, **extra: str) -> dict[str, str | None]:
    env: dict[str, str | None] = {"T_ADDR": repr(addr), **extra}
    if policy == "least_conn":
        env["T_POLICY_ATTR"] = policy  # set on the module before fork, not through the environment
    else:
        env["PREFORK_SCHED_POLICY"] = policy
    return env


def _listening(script, count: int) -> list[tuple[int, int, str, str, str]]:
    """Wait for `count` 'listening' lines: (worker id, pid, address, port, address type)."""
    def rows() -> list[tuple[int, int, str, str, str]]:
        out = []
        for line in script.lines():
            if line.startswith("listening "):
                _, wid, pid, address, port, kind = line.split()
                out.append((int(wid), int(pid), address, port, kind))
        return out

    if not wait_until(lambda: len(rows()) >= count, 15):
        pytest.fail(f"{count} workers did not listen\n--- stdout\n{script.stdout}--- stderr\n{script.stderr}")
    found = rows()
    script.track(*(row[1] for row in found))
    return found


def _ask(address: object, family: int = socket.AF_INET, timeout: float = 10.0, send: bytes = b"") -> str:
    """Connect, read until the server closes, return what it said."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        if send:
            s.sendall(send)
        data = b""
        while True:
            chunk = s.recv(64)
            if not chunk:
                return data.decode()
            data += chunk


def _ask_many(address: object, n: int, family: int = socket.AF_INET, threads: int = 10) -> list[str]:
    answers: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(k: int) -> None:
        for _ in range(k):
            try:
                answer = _ask(address, family)
            except BaseException as exc:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(exc)
                continue
            with lock:
                answers.append(answer)

    share = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
    pool = [threading.Thread(target=run, args=(k,)) for k in share if k]
    for t in pool:
        t.start()
    for t in pool:
        t.join(30)
    assert not errors, errors[:3]
    return answers


def _clients(port: int, n: int, spacing: float = 0.0, timeout: float = 20.0
             ) -> tuple[dict[int, str | BaseException], list[threading.Thread]]:
    """`n` clients started `spacing` apart, each asking once; their answers (or errors) by index."""
    results: dict[int, str | BaseException] = {}

    def client(i: int) -> None:
        try:
            results[i] = _ask(("127.0.0.1", port), timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - the tests assert on it
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
        if spacing:
            time.sleep(spacing)
    return results, threads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- one port for every worker -------------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_accept_socket_gives_the_connection_in_the_class_asked(py, policy):
    script = py.spawn(SERVER, env=_env(policy, ("127.0.0.1", 0), T_ACCEPT_SOCKET="1"))
    port = int(_listening(script, 2)[0][3])
    for _ in range(6):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            own = s.getsockname()[1]
            data = b""
            while chunk := s.recv(64):
                data += chunk
        assert data.decode() == f"Mine {own}"
    script.signal("SIGINT")
    script.finish()




@pytest.mark.parametrize("policy", POLICIES)
def test_workers_share_port_zero(py, policy):
    script = py.spawn(SERVER, env=_env(policy, ("127.0.0.1", 0), T_DELAY="0.05"))
    rows = _listening(script, 2)
    ports = {row[3] for row in rows}
    assert len(ports) == 1 and ports != {"0"}, rows  # port 0: every worker got the same port
    assert {row[4] for row in rows} == {"4"}
    answers = _ask_many(("127.0.0.1", int(ports.pop())), 40)
    assert len(answers) == 40
    assert set(answers) == {"1", "2"}, Counter(answers)  # served by both workers


@pytest.mark.parametrize("policy", POLICIES)
def test_workers_share_a_fixed_port(py, policy):
    port = _free_port()
    script = py.spawn(SERVER, env=_env(policy, ("127.0.0.1", port), T_DELAY="0.05", T_WORKERS="3"))
    rows = _listening(script, 3)
    assert {row[3] for row in rows} == {str(port)}
    answers = _ask_many(("127.0.0.1", port), 45)
    assert len(set(answers)) >= 2, Counter(answers)


# -- bind errors ---------------------------------------------------------------------------------

BIND_ERROR = r"""
import os, sys
import prefork as cluster

if cluster.is_primary:
    @cluster.on("exit")
    def on_exit(worker, code, signal):
        print("exit", worker.id, code, flush=True)
        if worker.id == 1 and not os.environ.get("T_EXCLUSIVE"):
            cluster.fork({"T_PORT": "0"})  # the primary lives on and can still serve
    cluster.on("listening", lambda w, a: print("listening", w.id, a.port, flush=True))
    cluster.fork()
else:
    try:
        listener = cluster.listen((os.environ.get("T_HOST", "127.0.0.1"), int(os.environ["T_PORT"])),
                                  exclusive=bool(os.environ.get("T_EXCLUSIVE")))
    except OSError as exc:
        print("error", exc.errno, type(exc).__name__, flush=True)
        sys.exit(3)
    listener.accept()
"""


@pytest.mark.parametrize("policy", POLICIES)
def test_bind_error_reaches_worker_listen(py, policy):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        script = py.spawn(BIND_ERROR, env={**_env(policy, None), "T_PORT": str(port)})
        m = script.expect(r"^error (\d+) (\w+)")
        assert int(m[1]) == errno.EADDRINUSE and m[2] == "OSError"
        script.expect(r"^exit 1 3$")
        script.expect(r"^listening 2 [1-9]\d*$")  # the primary lived on and served worker 2
        assert script.proc.poll() is None
        script.signal("SIGINT")
        script.finish()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may bind privileged ports")
def test_privileged_port_is_eacces(py):
    script = py.spawn(BIND_ERROR, env={"T_PORT": "81"})
    m = script.expect(r"^error (\d+)")
    assert int(m[1]) == errno.EACCES
    script.expect(r"^listening 2 ")
    script.signal("SIGINT")
    script.finish()


# -- address families ----------------------------------------------------------------------------


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("policy", ["rr", "none", "reuseport"])
def test_ipv6_loopback(py, policy):
    script = py.spawn(SERVER, env=_env(policy, ("::1", 0), T_DELAY="0.05"))
    rows = _listening(script, 2)
    assert {(row[2], row[4]) for row in rows} == {("::1", "6")}
    ports = {row[3] for row in rows}
    assert len(ports) == 1
    answers = _ask_many(("::1", int(ports.pop())), 20, family=socket.AF_INET6)
    assert set(answers) == {"1", "2"}


@pytest.mark.parametrize("policy", POLICIES)
def test_unix_socket_path(py, tmp_path, policy):
    path = str(tmp_path / "server.sock")
    script = py.spawn(SERVER, env=_env(policy, path, T_DELAY="0.05"))
    rows = _listening(script, 2)
    assert {(row[2], row[3], row[4]) for row in rows} == {(path, "None", "unix")}, rows
    answers = _ask_many(path, 30, family=socket.AF_UNIX)
    assert len(answers) == 30 and set(answers) <= {"1", "2"}
    assert len(set(answers)) == 2, Counter(answers)


# -- round robin's balance -----------------------------------------------------------------------

COUNTING = r"""
import os
import prefork as cluster

TOTAL = int(os.environ["T_TOTAL"])
if cluster.is_primary:
    counts = {}
    @cluster.on("message")
    def on_message(worker, message, handle):
        counts[worker.id] = counts.get(worker.id, 0) + 1
        if sum(counts.values()) == TOTAL:
            print("counts", " ".join(f"{k}={v}" for k, v in sorted(counts.items())), flush=True)
    cluster.on("listening", lambda w, a: print("listening", w.id, w.process.pid, a.address, a.port, 4,
                                               flush=True))
    for _ in range(2):
        cluster.fork()
else:
    listener = cluster.listen(("127.0.0.1", 0))
    while True:
        conn, _ = listener.accept()
        conn.sendall(b"%d" % cluster.worker.id)
        conn.close()
        cluster.worker.send("conn")  # counted by the primary
"""


def test_round_robin_splits_evenly(py):
    script = py.spawn(COUNTING, env={"T_TOTAL": "1000", "PREFORK_SCHED_POLICY": "rr"})
    rows = _listening(script, 2)
    answers = _ask_many(("127.0.0.1", int(rows[0][3])), 1000, threads=8)
    assert len(answers) == 1000
    m = script.expect(r"^counts 1=(\d+) 2=(\d+)$", timeout=15)
    a, b = int(m[1]), int(m[2])
    assert a + b == 1000
    assert abs(a - 500) <= 25 and abs(b - 500) <= 25, (a, b)  # each within 5% of half
    assert Counter(answers) == {"1": a, "2": b}


# -- no connection lost when a worker goes -------------------------------------------------------

# Worker 1 is stuck (it listens but never accepts): what reaches it waits in its window (rr,
# least_conn) or in its socket's queue (reuseport). Then the test kills it.
STUCK = r"""
import os, time
import prefork as cluster

if os.environ.get("T_POLICY_ATTR"):
    cluster.scheduling_policy = os.environ["T_POLICY_ATTR"]
if cluster.is_primary:
    cluster.on("listening", lambda w, a: print("listening", w.id, w.process.pid, a.address, a.port, 4,
                                               flush=True))
    cluster.on("exit", lambda w, code, sig: print("exit", w.id, code, sig, flush=True))
    cluster.fork()
    cluster.fork()
else:
    listener = cluster.listen(("127.0.0.1", 0))
    if cluster.worker.id == 1:
        while True:
            time.sleep(1)
    while True:
        conn, _ = listener.accept()
        conn.sendall(b"%d" % cluster.worker.id)
        conn.close()
"""


@pytest.mark.parametrize("policy", POLICIES)
def test_no_connection_lost_when_worker_killed(py, policy):
    script = py.spawn(STUCK, env=_env(policy, None))
    rows = {row[0]: row for row in _listening(script, 2)}
    port = int(rows[1][3])
    results, threads = _clients(port, 30, spacing=0.005, timeout=15)
    # Worker 2's share is answered; worker 1's waits for it.
    assert wait_until(lambda: len(results) >= 5, 10), results
    time.sleep(0.3)
    waiting = 30 - len(results)
    os.kill(rows[1][1], signal.SIGKILL)
    script.expect(r"^exit 1 None SIGKILL$")
    for t in threads:
        t.join(20)
    assert all(r == "2" for r in results.values()), results
    assert len(results) == 30
    if policy != "none":
        assert waiting > 0  # some connections really were queued for the killed worker
    script.signal("SIGINT")
    script.finish()


def test_a_stuck_worker_holds_at_most_its_window_then_gives_it_back(py):
    """rr: a worker that never accepts gets exactly WINDOW connections, the other serves the rest;
    killed, its WINDOW waiting connections are served by the other worker, none lost."""
    from prefork.policies.round_robin import WINDOW

    script = py.spawn(STUCK, env=_env("rr", None))
    rows = {row[0]: row for row in _listening(script, 2)}
    port = int(rows[1][3])
    total = WINDOW + 100
    results, threads = _clients(port, total)
    assert wait_until(lambda: len(results) >= total - WINDOW, 15), len(results)
    time.sleep(0.5)
    assert len(results) == total - WINDOW  # the stuck one holds exactly its window, no more
    os.kill(rows[1][1], signal.SIGKILL)
    script.expect(r"^exit 1 None SIGKILL$")
    for t in threads:
        t.join(20)
    assert len(results) == total and all(r == "2" for r in results.values()), results
    script.signal("SIGINT")
    script.finish()


def test_least_conn_sends_nothing_more_to_a_worker_that_does_not_read(py):
    """least_conn: once a connection waits unread for the stuck worker, the others get the rest
    (round robin would keep giving it every other one, up to its window)."""
    script = py.spawn(STUCK, env=_env("least_conn", None))
    rows = {row[0]: row for row in _listening(script, 2)}
    port = int(rows[1][3])
    total = 100
    results, threads = _clients(port, total, spacing=0.002)  # a few at a time, as a client pool would
    assert wait_until(lambda: len(results) >= total - 3, 15), len(results)
    time.sleep(0.3)
    assert total - 3 <= len(results) < total  # at most 3 went to the stuck worker, and some did
    os.kill(rows[1][1], signal.SIGKILL)
    script.expect(r"^exit 1 None SIGKILL$")
    for t in threads:
        t.join(20)
    assert len(results) == total and all(r == "2" for r in results.values()), results
    script.signal("SIGINT")
    script.finish()


# Worker 1's server is eager (set_eager). With both workers listening, the primary's loop is held
# up for a moment: it then accepts the eight waiting connections at once, four for each worker,
# worker 1's in one record. Worker 1 takes one and closes its listener holding the other three:
# they go back to the primary, and on to worker 2.
EAGER_CLOSE = r"""
import select, time
import prefork as cluster

if cluster.is_primary:
    listening = []
    def on_listening(worker, address):
        print("listening", worker.id, worker.process.pid, address.address, address.port, 4, flush=True)
        listening.append(worker)
        if len(listening) == 2:
            cluster.workers[1].send("go")
    cluster.on("listening", on_listening)
    def on_message(worker, message, handle):
        if message == "hold":
            print("holding", flush=True)
            time.sleep(1.0)  # on the primary's loop: connections pile up in the backlog
        else:
            print("worker", worker.id, message, flush=True)
    cluster.on("message", on_message)
    cluster.fork()
    cluster.fork()
else:
    listener = cluster.listen(("127.0.0.1", 0))
    if cluster.worker.id == 1:
        listener.set_eager()
        go = []
        cluster.worker.on("message", lambda m, h: go.append(m))
        while not go:
            time.sleep(0.01)
        cluster.worker.send("hold")
        select.select([listener], [], [])
        conn = listener.accept_socket()
        conn.sendall(b"1")
        conn.close()
        cluster.worker.send(f"held {len(listener._queue)}")
        listener.close()
        time.sleep(60)
    while True:
        conn, _ = listener.accept()
        conn.sendall(b"%d" % cluster.worker.id)
        conn.close()
"""


def test_an_eager_listener_closing_gives_back_what_it_held(py):
    script = py.spawn(EAGER_CLOSE, env={"PREFORK_SCHED_POLICY": "rr"})
    port = int(_listening(script, 2)[0][3])
    script.expect(r"^holding$")
    results, threads = _clients(port, 8)
    script.expect(r"^worker 1 held 3$")
    for t in threads:
        t.join(20)
    assert sorted(results.values()) == ["1"] + ["2"] * 7, results
    script.signal("SIGINT")
    script.finish()


# Worker 1 answers slowly over http.server, one request at a time, so connections queue in its
# window; the primary then disconnects it. The request it serves finishes; the queued ones go to
# worker 2. Every client gets its 200.
SLOW_HTTP = r"""
import os, time
from http.server import BaseHTTPRequestHandler
import prefork as cluster

if os.environ.get("T_POLICY_ATTR"):
    cluster.scheduling_policy = os.environ["T_POLICY_ATTR"]
if cluster.is_primary:
    cluster.on("listening", lambda w, a: print("listening", w.id, w.process.pid, a.address, a.port, 4,
                                               flush=True))
    cluster.on("exit", lambda w, code, sig: print("exit", w.id, code, sig, flush=True))
    def on_message(worker, message, handle):
        if message == "busy" and worker.id == 1:
            time.sleep(0.25)  # let more connections queue in its window
            print("disconnecting 1", flush=True)
            worker.disconnect()
    cluster.on("message", on_message)
    cluster.fork()
    cluster.fork()
else:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if cluster.worker.id == 1:
                cluster.worker.send("busy")
                time.sleep(0.5)
            body = str(cluster.worker.id).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    cluster.HTTPServer(("127.0.0.1", 0), Handler).serve_forever()
    print("worker", cluster.worker.id, "served to the end", flush=True)
"""


@pytest.mark.timeout(120)  # its clients may wait 40 s on a loaded machine
@pytest.mark.parametrize("policy", ["rr", "least_conn", "reuseport", "none"])
def test_no_request_lost_when_worker_disconnects(py, policy):
    import http.client

    script = py.spawn(SLOW_HTTP, env=_env(policy, None))
    rows = {row[0]: row for row in _listening(script, 2)}
    port = int(rows[1][3])
    results: dict[int, object] = {}

    def client(i: int) -> None:
        try:
            # a slot's queue may be served by the leaving worker itself, one at a time (drain()'s
            # take_pending): ~10 x 0.5 s, far longer on a loaded machine
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=40)
            conn.request("GET", "/")
            resp = conn.getresponse()
            results[i] = (resp.status, resp.read().decode())
            conn.close()
        except BaseException as exc:  # noqa: BLE001 - asserted below
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
        time.sleep(0.01)
    script.expect(r"^disconnecting 1$", timeout=20)
    for t in threads:
        t.join(45)
    assert len(results) == 20
    failed = {i: r for i, r in results.items() if not (isinstance(r, tuple) and r[0] == 200)}
    assert not failed, f"failed: {failed!r}; stdout: {script.stdout[-2000:]}"
    script.expect(r"^exit 1 0 None$")
    assert "worker 1 served to the end" in script.stdout  # serve_forever() returned, the script ended
    if policy in ("rr", "least_conn"):
        assert ("2" in {r[1] for r in results.values()})  # type: ignore[index]
    script.signal("SIGINT")
    script.finish()


# -- closing ---------------------------------------------------------------------------------------

CLOSING = r"""
import os, signal
import prefork as cluster

if os.environ.get("T_POLICY_ATTR"):
    cluster.scheduling_policy = os.environ["T_POLICY_ATTR"]
if cluster.is_primary:
    cluster.on("listening", lambda w, a: print("listening", w.id, w.process.pid, a.address, a.port, 4,
                                               flush=True))
    order = []
    def close_next(signum, frame):
        order.append(len(order) + 1)
        cluster.workers[order[-1]].send("close")
    signal.signal(signal.SIGUSR1, close_next)
    cluster.on("message", lambda w, m, h: print(m, w.id, flush=True))
    cluster.fork()
    cluster.fork()
else:
    listener = cluster.listen(("127.0.0.1", 0))
    def on_message(message, handle):
        listener.close()
        cluster.worker.send("closed")
    cluster.worker.on("message", on_message)
"""


@pytest.mark.parametrize("policy", POLICIES)
def test_last_listener_closed_closes_the_port(py, policy):
    script = py.spawn(CLOSING, env=_env(policy, None))
    rows = _listening(script, 2)
    port = int(rows[0][3])
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    script.signal("SIGUSR1")
    script.expect(r"^closed 1$")
    socket.create_connection(("127.0.0.1", port), timeout=5).close()  # worker 2 still listens
    script.signal("SIGUSR1")
    script.expect(r"^closed 2$")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    script.signal("SIGINT")
    script.finish()


EXCLUSIVE = r"""
import os
import prefork as cluster

if cluster.is_primary:
    cluster.on("listening", lambda w, a: print("listening", w.id, w.process.pid, a.address, a.port, 4,
                                               flush=True))
    cluster.fork()
    cluster.fork()
else:
    listener = cluster.listen(("127.0.0.1", int(os.environ.get("T_PORT", "0"))), exclusive=True)
    while True:
        conn, _ = listener.accept()
        conn.sendall(b"%d" % cluster.worker.id)
        conn.close()
"""


def test_exclusive_gives_the_worker_its_own_socket(py):
    script = py.spawn(EXCLUSIVE)
    rows = {row[0]: row for row in _listening(script, 2)}
    assert rows[1][3] != rows[2][3]  # two sockets, two ports
    for wid in (1, 2):
        assert _ask(("127.0.0.1", int(rows[wid][3]))) == str(wid)
    script.signal("SIGINT")
    script.finish()


def test_exclusive_on_a_taken_port_is_eaddrinuse(py):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = py.run(BIND_ERROR, env={"T_PORT": str(port), "T_EXCLUSIVE": "1"})
    assert re.search(rf"^error {errno.EADDRINUSE} OSError$", result.stdout, re.M), result


REFORK = r"""
import os, sys, time
import prefork as cluster
from http.server import BaseHTTPRequestHandler

if cluster.is_primary:
    generation = [1]

    @cluster.on("listening")
    def on_listening(worker, address):
        print("listening", generation[0], worker.id, address.port, flush=True)

    def second_generation(worker, message, handle):
        generation[0] = 2
        cluster.disconnect(lambda: print("disconnected", flush=True))
        cluster.fork()  # at once: it listens while the first generation still drains

    cluster.on("message", second_generation)
    cluster.fork()
else:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/go":
                cluster.worker.send("go")
                time.sleep(1.0)  # in flight while the next generation starts
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"%d" % cluster.worker.id)

        def log_message(self, *args):
            pass

    cluster.ThreadingHTTPServer(("127.0.0.1", int(os.environ["T_PORT"])), Handler).serve_forever()
"""


@pytest.mark.parametrize("policy", POLICIES)
def test_workers_forked_after_cluster_disconnect_serve_the_same_port(py, policy):
    """disconnect() closes the shared server; a generation forked at once listens on the port again."""
    import urllib.request

    port = _free_port()
    script = py.spawn(REFORK, env={"PREFORK_SCHED_POLICY": policy, "T_PORT": str(port)})
    script.expect(r"^listening 1 1 ")
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/go", timeout=5).read() == b"1"
    script.expect(r"^listening 2 2 ")
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read() == b"2"
    script.signal("SIGINT")
    script.finish()
