"""Workers (and the primary) at their file descriptor limit: they drop what they cannot take, stay
in the pool, do not spin, and serve again once descriptors are free.

Each worker lowers its own RLIMIT_NOFILE a little above the descriptors it holds once listening, so
a few dozen idle clients use up what is left.

The back-off tests of a worker whose own socket is at its limit run each server (thread, aio, serve)
under both policies that give a worker its own listening socket (none, reuseport) and serve's workers
both ways they start (--preload, --no-preload), but not every combination: the accept loop that backs
off is the same whichever way the worker listens or started. FD_LIMITS_ALL=1 runs the whole grid.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
from cli_helpers import ctl_json, free_port, prefork_cmd  # noqa: F401
from conftest import wait_until

HEADROOM = 12  # descriptors left to the worker above those it holds once listening

# T_KIND: "thread" (prefork.ThreadingHTTPServer), "aio" (prefork.start_server)
WORKER = r"""
import os, resource, sys
import prefork as cluster

HEADROOM = int(os.environ["T_HEADROOM"])


def lower_limit():
    top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1 + HEADROOM, hard))


if cluster.is_primary:
    if os.environ.get("T_POLICY_ATTR"):
        cluster.scheduling_policy = os.environ["T_POLICY_ATTR"]
    cluster.on("listening", lambda w, a: print("listening", w.process.pid, a.port, flush=True))
    cluster.fork()
elif os.environ["T_KIND"] == "thread":
    from http.server import BaseHTTPRequestHandler

    class Hello(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "6")
            self.end_headers()
            self.wfile.write(b"hello\n")

        def log_message(self, *args):
            pass

    server = cluster.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    server.daemon_threads = True
    lower_limit()
    server.serve_forever()
else:
    import asyncio

    async def handle(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n")
            await writer.drain()
        except Exception:
            pass
        writer.close()

    async def main():
        server = await cluster.start_server(handle, "127.0.0.1", 0)
        lower_limit()
        await server.serve_forever()

    asyncio.run(main())
"""


def _env(policy: str, kind: str) -> dict[str, str | None]:
    env: dict[str, str | None] = {"T_KIND": kind, "T_HEADROOM": str(HEADROOM)}
    if policy == "least_conn":
        env["T_POLICY_ATTR"] = policy
    else:
        env["PREFORK_SCHED_POLICY"] = policy
    return env


def _get(port: int, timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
        return data.startswith((b"HTTP/1.0 200 ", b"HTTP/1.1 200 ")) and b"hello" in data
    except OSError:
        return False


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _idle_clients(port: int, count: int) -> list[socket.socket]:
    clients = []
    for _ in range(count):
        clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    return clients


def _serves_again(port: int) -> None:
    """Once the idle clients are gone, every new request is answered (after a back-off, maybe)."""
    assert wait_until(lambda: _get(port, timeout=2.0), timeout=15), "the worker does not serve again"
    answered = sum(_get(port) for _ in range(20))
    assert answered == 20, f"{20 - answered} of 20 requests unanswered"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["rr", "least_conn"])
@pytest.mark.parametrize("kind", ["thread", "aio"])
def test_handed_over_worker_out_of_descriptors_stays_in_the_pool(py, policy, kind):
    script = py.spawn(WORKER, env=_env(policy, kind))
    m = script.expect(r"^listening (\d+) (\d+)")
    pid, port = int(m[1]), int(m[2])
    script.track(pid)
    assert _get(port)
    base = _open_fds(pid)
    clients = _idle_clients(port, HEADROOM * 3)  # more than it can take: some records arrive cut
    try:
        # at its limit, or (an eager server's one record for all of them) the record dropped whole
        wait_until(lambda: _open_fds(pid) >= base + HEADROOM - 2 or "out of file" in script.stderr,
                   timeout=5)
        time.sleep(1.0)  # the rest of the records reach it meanwhile
    finally:
        for client in clients:
            client.close()
    _serves_again(port)
    lines = [line for line in script.stderr.splitlines() if "out of file descriptors" in line]
    assert len(lines) == 1, script.stderr


def _grid(first: list[str], second: list[str]) -> list[tuple[str, str]]:
    """Each value of each parameter once (the diagonal), or every pair with FD_LIMITS_ALL=1."""
    if os.environ.get("FD_LIMITS_ALL"):
        return [(a, b) for a in first for b in second]
    return list(zip(first, second, strict=True))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("kind", "policy"), _grid(["thread", "aio"], ["none", "reuseport"]))
def test_worker_at_its_limit_backs_off(py, policy, kind):
    script = py.spawn(WORKER, env=_env(policy, kind))
    m = script.expect(r"^listening (\d+) (\d+)")
    pid, port = int(m[1]), int(m[2])
    script.track(pid)
    assert _get(port)
    base = _open_fds(pid)
    clients = _idle_clients(port, HEADROOM * 3)  # more than it can accept: the rest stay queued
    try:
        assert wait_until(lambda: _open_fds(pid) >= base + HEADROOM - 2, timeout=15)
        time.sleep(0.3)
        start_cpu, start = _cpu_seconds(pid), time.monotonic()
        time.sleep(1.0)  # two retries at least (ACCEPT_RETRY_S 0.5 s); a spinning worker burns most of it
        share = (_cpu_seconds(pid) - start_cpu) / (time.monotonic() - start)
        assert share < 0.3, f"the worker spins at its descriptor limit: {share:.0%} of a core"
    finally:
        for client in clients:
            client.close()
    _serves_again(port)


# The primary, under rr, at its own limit: it lowers it once its worker listens, holds every
# descriptor left, and gives them back after T_HOLD seconds.
PRIMARY = r"""
import os, resource, threading
import prefork as cluster

if cluster.is_primary:
    def starve(worker, address):
        top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
        held = []
        while True:
            try:
                held.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break

        def release():
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            print("released", flush=True)

        threading.Timer(float(os.environ["T_HOLD"]), release).start()
        print("starved", address.port, flush=True)

    cluster.once("listening", starve)
    cluster.fork()
else:
    from http.server import BaseHTTPRequestHandler

    class Hello(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "6")
            self.end_headers()
            self.wfile.write(b"hello\n")

    cluster.ThreadingHTTPServer(("127.0.0.1", 0), Hello).serve_forever()
"""


@pytest.mark.timeout(60)
def test_rr_primary_at_its_limit_backs_off(py):
    script = py.spawn(PRIMARY, env={"PREFORK_SCHED_POLICY": "rr", "T_HOLD": "2.5"})  # > the 1.3 s below
    port = int(script.expect(r"^starved (\d+)")[1])
    waiting = socket.create_connection(("127.0.0.1", port), timeout=10)  # queued: nothing to accept with
    try:
        time.sleep(0.3)
        start_cpu, start = _cpu_seconds(script.pid), time.monotonic()
        time.sleep(1.0)  # two retries at least (ACCEPT_RETRY_S 0.5 s); a spinning primary burns most of it
        share = (_cpu_seconds(script.pid) - start_cpu) / (time.monotonic() - start)
        assert share < 0.3, f"the primary spins at its descriptor limit: {share:.0%} of a core"
        script.expect(r"^released", timeout=15)
        waiting.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert waiting.recv(100).startswith(b"HTTP/1.")  # the queued one is served after all
    finally:
        waiting.close()
    _serves_again(port)


SERVE_LIMIT = 96  # the whole `prefork serve` command's soft limit: a worker uses some 40 when idle


def _serve_limit() -> None:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (SERVE_LIMIT, hard))


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("policy", "preload"), _grid(["none", "reuseport"], ["--preload", "--no-preload"]))
def test_serve_worker_at_its_limit_backs_off(prefork_cmd, tmp_path, policy, preload):  # noqa: F811
    port = free_port()
    control = str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", "tests.apps.hello:asgi", "--workers", "1", "--bind", f"127.0.0.1:{port}",
                      "--policy", policy, "--control", control, preload, preexec_fn=_serve_limit)
    cmd.wait_ready()
    (pid,) = cmd.track_workers(control)
    assert _get(port)
    clients = _idle_clients(port, SERVE_LIMIT + 20)  # more than it can accept: the rest stay queued
    try:
        assert wait_until(lambda: _open_fds(pid) >= SERVE_LIMIT - 2, timeout=15), _open_fds(pid)
        time.sleep(0.3)
        start_cpu, start = _cpu_seconds(pid), time.monotonic()
        time.sleep(1.0)  # two retries at least (ACCEPT_RETRY_S 0.5 s); a spinning worker burns most of it
        share = (_cpu_seconds(pid) - start_cpu) / (time.monotonic() - start)
        assert share < 0.3, f"the worker spins at its descriptor limit: {share:.0%} of a core"
    finally:
        for client in clients:
            client.close()
    _serves_again(port)
    assert ctl_json(control)["workers"][0]["pid"] == pid
