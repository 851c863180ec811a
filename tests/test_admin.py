"""The admin endpoint (`--admin`, src/prefork/admin.py) of a real `prefork serve`: its states across a
start, a kill and a stop, and how it bounds what a client may do."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from cli_helpers import ctl_json, free_port, pid_alive, prefork_cmd, run_prefork  # noqa: F401
from conftest import wait_until

SLOW = "tests.apps.slow_start:app"


def admin_get(port: int, path: str, method: str = "GET", timeout: float = 10.0) -> tuple[int, str]:
    """(status, body) of one request to the admin port, on a fresh connection."""
    with httpx.Client(timeout=timeout) as client:
        reply = client.request(method, f"http://127.0.0.1:{port}{path}")
        assert reply.headers.get("connection") == "close"
        return reply.status_code, reply.text


def raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text exposition, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def serve(prefork_cmd, tmp_path: Path, app: str, *extra: str, workers: int = 2, env=None):  # noqa: F811
    port, admin = free_port(), free_port()
    cmd = prefork_cmd("serve", app, "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
                      "--admin", f"127.0.0.1:{admin}", "--control", str(tmp_path / "ctl.sock"), *extra,
                      env=env)
    cmd.expect(rf"admin\s+http://127\.0\.0\.1:{admin}\s+\(/livez /readyz /metrics /status\)")
    return cmd, port, admin


def answers(admin: int, path: str) -> tuple[int, str] | None:
    try:
        return admin_get(admin, path, timeout=3.0)
    except httpx.HTTPError:
        return None


def scraped(admin: int, name: str, **labels: str) -> float | None:
    """One sample of /metrics now (None if it did not answer)."""
    reply = answers(admin, "/metrics")
    return None if reply is None else metric(reply[1], name, **labels)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("preload", ["--preload", "--no-preload"])
def test_states_across_a_start_a_kill_and_a_stop(prefork_cmd, tmp_path: Path, preload: str) -> None:  # noqa: F811
    gate = tmp_path / "gate"
    cmd, port, admin = serve(prefork_cmd, tmp_path, SLOW, preload, env={"SLOW_START_GATE": str(gate)})
    # starting: the template, or each worker, imports the app (held by the gate); alive, not ready
    assert wait_until(lambda: answers(admin, "/readyz") is not None, 20)
    status, body = admin_get(admin, "/readyz")
    assert (status, body) == (503, "no worker is ready yet\n")
    assert admin_get(admin, "/livez")[0] == 200
    starting = metric(admin_get(admin, "/metrics")[1], "prefork_workers", state="starting")
    assert starting == (0 if preload == "--preload" else 2)  # preloaded: forked once it is imported
    gate.write_text("go")
    assert wait_until(lambda: answers(admin, "/readyz") == (200, "ready\n"), 30), cmd.output
    cmd.wait_ready()
    status, body = admin_get(admin, "/status")
    assert status == 200
    state = json.loads(body)
    assert state["ready"] is True and [w["state"] for w in state["workers"]] == ["ready", "ready"]
    assert state["control"] == str(tmp_path / "ctl.sock")
    from_ctl = ctl_json(str(tmp_path / "ctl.sock"))  # the same document as `prefork ctl status --json`
    assert set(from_ctl) == set(state) and from_ctl["pid"] == state["pid"] == cmd.proc.pid
    assert [w["pid"] for w in from_ctl["workers"]] == [w["pid"] for w in state["workers"]]
    pids = [w["pid"] for w in state["workers"]]
    cmd.worker_pids.update(pids)

    # a kill: livez stays 200 while the other worker lives; the restart is counted
    os.kill(pids[0], signal.SIGKILL)
    assert admin_get(admin, "/livez")[0] == 200
    assert admin_get(admin, "/readyz")[0] == 200  # the other worker is still ready
    assert wait_until(lambda: scraped(admin, "prefork_worker_restarts_total") == 1, 20)
    assert wait_until(lambda: scraped(admin, "prefork_workers", state="ready") == 2, 30)
    cmd.track_workers(str(tmp_path / "ctl.sock"))

    # a stop with a request in flight: while the workers drain, readyz is 503 and livez answers
    slow = threading.Thread(target=lambda: httpx.get(f"http://127.0.0.1:{port}/sleep?2.5", timeout=30))
    slow.start()
    in_flight = lambda: sum(w["in_flight"] for w in json.loads(admin_get(admin, "/status")[1])["workers"])  # noqa: E731
    assert wait_until(in_flight, 10)
    cmd.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: answers(admin, "/readyz") == (503, "stopping\n"), 10)
    seen = answers(admin, "/metrics")
    assert seen is not None and metric(seen[1], "prefork_ready") == 0
    assert admin_get(admin, "/livez")[0] == 200  # a draining worker is alive
    slow.join(30)
    assert cmd.finish(30) == 0
    with pytest.raises(OSError):  # closed with the primary
        socket.create_connection(("127.0.0.1", admin), timeout=2).close()


@pytest.mark.timeout(90)
def test_bad_requests_are_answered_and_bounded(prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    cmd, port, admin = serve(prefork_cmd, tmp_path, "tests.apps.hello:asgi", workers=1)
    cmd.wait_ready()
    assert admin_get(admin, "/livez", "POST")[0] == 405
    assert admin_get(admin, "/readyz", "DELETE")[0] == 405
    assert admin_get(admin, "/nope")[0] == 404
    assert admin_get(admin, "/readyz?verbose=1")[0] == 200  # a query is ignored
    head = raw(admin, b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")  # no body
    assert raw(admin, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(admin, b"GET /readyz\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    big = b"GET /readyz HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    assert raw(admin, big).startswith(b"HTTP/1.1 431 ")

    # a client that sends nothing is closed after the deadline (5 s); meanwhile others are answered
    idle = [socket.create_connection(("127.0.0.1", admin), timeout=20) for _ in range(30)]
    try:
        start = time.monotonic()
        assert admin_get(admin, "/readyz", timeout=2.0)[0] == 200
        assert time.monotonic() - start < 1.0
        assert idle[0].recv(1) == b""  # EOF, from the server
        assert 3.0 < time.monotonic() - start < 15.0
    finally:
        for sock in idle:
            sock.close()

    # more idle connections than the admin server keeps: the oldest are closed, a probe still answered
    flood = [socket.create_connection(("127.0.0.1", admin), timeout=20) for _ in range(100)]
    try:
        assert admin_get(admin, "/readyz", timeout=3.0)[0] == 200
        assert flood[0].recv(1) == b""  # closed long before the deadline to make room
    finally:
        for sock in flood:
            sock.close()
    assert admin_get(admin, "/livez")[0] == 200


@pytest.mark.timeout(60)
def test_bind_errors_are_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = run_prefork(["serve", "tests.apps.hello:asgi", "--bind", f"127.0.0.1:{free_port()}",
                              "--admin", f"127.0.0.1:{busy}", "--control", str(tmp_path / "c.sock")])
    assert result.returncode == 1, result
    assert f"cannot serve --admin 127.0.0.1:{busy}: address already in use" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    result = run_prefork(["serve", "tests.apps.hello:asgi", "--bind", f"127.0.0.1:{free_port()}",
                          "--admin", "192.0.2.1:9000", "--control", str(tmp_path / "c.sock")])
    assert result.returncode == 1, result  # TEST-NET-1: no address of this machine
    assert "cannot serve --admin 192.0.2.1:9000: 192.0.2.1 is not an address" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    result = run_prefork(["serve", "tests.apps.hello:asgi", "--bind", f"127.0.0.1:{free_port()}",
                          "--admin", "no-such-host.invalid:9000", "--control", str(tmp_path / "c.sock")])
    assert result.returncode == 2 and "unknown host" in result.stderr, result  # cli/config.py's check
    result = run_prefork(["serve", "tests.apps.hello:asgi", "--admin", "9000x"])
    assert result.returncode == 2 and "expected HOST:PORT" in result.stderr, result
    assert "unix:" not in result.stderr and "fd://" not in result.stderr, result.stderr  # TCP only


SILENT = '''
import time, prefork
from prefork import _role
if prefork.is_worker:
    _role.child.internal["m"] = lambda message, fds: None  # never answers a scrape: each waits 0.5 s
    while True:
        time.sleep(1)
'''


@pytest.mark.timeout(60)
def test_probes_are_answered_while_scrapes_wait(prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    """70 scrapes wait on a worker that does not answer: past MAX_WAITING they are answered 503 at
    once, so the connection table keeps room and a probe is answered, not closed."""
    script = tmp_path / "silent.py"
    script.write_text(SILENT)
    admin = free_port()
    cmd = prefork_cmd("run", "--workers", "1", "--ready", "online", "--admin", f"127.0.0.1:{admin}",
                      "--control", str(tmp_path / "ctl.sock"), str(script))
    cmd.wait_ready()
    for _ in range(3):
        scrapes = []
        try:
            for _ in range(70):
                sock = socket.create_connection(("127.0.0.1", admin), timeout=10)
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                scrapes.append(sock)
            assert raw(admin, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200 ")
            assert raw(admin, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200 ")
            replies = Counter()
            for sock in scrapes:
                out = b""
                while chunk := sock.recv(65536):
                    out += chunk
                replies[out[:12]] += 1
            assert replies[b"HTTP/1.1 200"] >= 16 and replies[b"HTTP/1.1 503"] >= 1, replies
            assert set(replies) == {b"HTTP/1.1 200", b"HTTP/1.1 503"}, replies
        finally:
            for sock in scrapes:
                sock.close()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(60)
def test_out_of_descriptors_the_admin_server_backs_off(prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    """At its descriptor limit the primary stops accepting on the admin port for a while instead of
    spinning on a listening socket that stays readable; with descriptors back, it answers again."""
    import resource

    cmd, port, admin = serve(prefork_cmd, tmp_path, "tests.apps.hello:asgi", workers=1)
    cmd.wait_ready()
    cmd.track_workers(str(tmp_path / "ctl.sock"))
    pid = cmd.proc.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    held = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (held + 2, limits[1]))
    clients = []
    try:
        for _ in range(10):
            clients.append(socket.create_connection(("127.0.0.1", admin), timeout=5))
        time.sleep(0.5)  # the primary is at its limit, some connections wait in the backlog
        before = _cpu_seconds(pid)
        time.sleep(1.0)  # two retries at least (ACCEPT_RETRY_S 0.5 s); a spinning primary burns most of it
        assert _cpu_seconds(pid) - before < 0.25, "the primary spins at its descriptor limit"
    finally:
        for sock in clients:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    assert wait_until(lambda: answers(admin, "/livez") is not None and answers(admin, "/livez")[0] == 200, 10)
