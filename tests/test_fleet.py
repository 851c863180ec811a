"""A rolling deploy across two hosts behind a real HAProxy, under load, loses no request (slow).

Two `prefork serve` instances run on this machine, each its own "host" with its own app port and
admin port (`--admin`, `--shutdown-delay`). HAProxy runs in front of them with deploy/haproxy/haproxy.cfg,
only its addresses replaced (the test fails if that file's shape changes so that they cannot be).
Client threads send GET requests through HAProxy the whole time, on keep-alive connections and on
new ones; every answer's body names the instance that served it ("A1", then "A2" after the roll).

The roll, host by host, as on a real fleet: SIGTERM the old instance; its /readyz turns 503 at once
and it serves on for the shutdown delay, during which HAProxy's check marks it DOWN; then it drains
and exits. Its replacement starts on the same ports (a host has one set of ports), and the test
waits until its /readyz is 200 and HAProxy shows it UP before it rolls the next host.

Asserted: not one request failed (each answer 200 and complete), HAProxy marked each old host DOWN
before it exited, and both hosts served traffic before and after the roll. HAProxy comes from
Debian's packages when it is missing (root only; otherwise, or if apt-get fails, the test skips
and says why). Everything the test starts is ended by pid on the way out. FLEET_DELAY=0 (no shutdown
delay) makes it fail; FLEET_UVICORN=1 also runs the same roll with uvicorn, for deploy/README.md.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_helpers import Cmd, clean_env, free_port, pid_alive, prefork_cmd  # noqa: F401
from conftest import children, wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
# HAProxy needs 1.25 to 2.25 s to mark a host down (deploy/haproxy/haproxy.cfg), more on a busy
# machine: the delay leaves room for that; FLEET_DELAY=0 shows the test failing without a delay
SHUTDOWN_DELAY = float(os.environ.get("FLEET_DELAY", "4.0"))
CLIENTS = 6
CLIENT_TIMEOUT = 10.0

APP = '''\
import asyncio
import os

NAME = os.environ["FLEET_NAME"].encode()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/slow":  # keeps requests in flight while a host stops
        await asyncio.sleep(0.05)
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(NAME)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": NAME})
'''


# -- HAProxy ------------------------------------------------------------------------------------------

def find_haproxy() -> str:
    """The haproxy binary; installed from Debian's packages when missing, or the test skips."""
    for found in (shutil.which("haproxy"), "/usr/sbin/haproxy"):
        if found and os.access(found, os.X_OK):
            return found
    if os.geteuid() != 0:
        pytest.skip("haproxy is not installed and the test is not root (apt-get install haproxy)")
    if not shutil.which("apt-get"):
        pytest.skip("haproxy is not installed and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "haproxy"]
    why = ""
    for before in ([], [["apt-get", "update"]]):  # an old package list may not have it: update once
        try:
            for cmd in [*before, install]:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
                if done.returncode != 0:
                    why = f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-300:]}"
                    break
            else:
                why = ""
        except subprocess.TimeoutExpired as exc:
            why = f"{' '.join(exc.cmd)} took more than 240 s"
        if not why and os.access("/usr/sbin/haproxy", os.X_OK):
            return "/usr/sbin/haproxy"
    pytest.skip(f"cannot install haproxy: {why or 'installed, but /usr/sbin/haproxy is missing'}")


def fleet_config(lb_port: int, hosts: list[tuple[int, int]], stats: Path) -> str:
    """deploy/haproxy/haproxy.cfg with this machine's addresses; each edit must match, as documented."""
    text = DEPLOY_CFG.read_text()

    def sub(pattern: str, repl, count: int) -> None:
        nonlocal text
        text, n = re.subn(pattern, repl, text, flags=re.M)
        assert n == count, f"{DEPLOY_CFG}: expected {count} line(s) matching {pattern!r}, found {n}"

    sub(r"^(\s*)bind :80$", rf"\g<1>bind 127.0.0.1:{lb_port}", 1)
    sub(r"^(\s*stats socket) /run/haproxy/admin\.sock", rf"\g<1> {stats}", 1)
    sub(r"^\s*(chroot|user|group) .*$", "", 3)  # the test's HAProxy runs as the test's user, in place
    ports = iter(hosts)
    sub(r"^(\s*server host\d) \S+ check port \d+$",
        lambda m: "{} 127.0.0.1:{} check port {}".format(m[1], *next(ports)), len(hosts))
    return text


class HAProxy:
    def __init__(self, binary: str, folder: Path, lb_port: int, hosts: list[tuple[int, int]],
                 edit=lambda text: text) -> None:
        self.stats = folder / "haproxy.sock"
        self.config = folder / "haproxy.cfg"
        self.config.write_text(edit(fleet_config(lb_port, hosts, self.stats)))
        self.log = folder / "haproxy.log"
        with open(self.log, "wb") as out:
            # -db: stay in the foreground, no master process: one pid to end
            self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stat(self) -> dict[str, dict[str, str]]:
        """The stats socket's `show stat` rows of the backend, by server name (and "BACKEND")."""
        assert self.proc.poll() is None, f"haproxy exited ({self.proc.returncode})\n{self.tail()}"
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(self.stats))
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {r["svname"]: r for r in rows if r["pxname"] == "prefork"}

    def servers(self) -> dict[str, str]:
        """Each server's status: "UP", "DOWN", "UP 1/2" (going down), ..."""
        return {name: row["status"] for name, row in self.stat().items() if name.startswith("host")}

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# -- the hosts ----------------------------------------------------------------------------------------

@dataclass
class Host:
    """One "host": a fixed app port and admin port, on which instances follow one another."""

    label: str  # "host1": its name in haproxy.cfg
    letter: str  # "A"
    port: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    cmd: Cmd | None = None
    generation: int = 0

    def readyz(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0


def start(prefork_cmd, folder: Path, host: Host) -> Cmd:  # noqa: F811
    host.generation += 1
    cmd = prefork_cmd(
        "serve", "app:app", "--workers", "2", "--bind", f"127.0.0.1:{host.port}",
        "--admin", f"127.0.0.1:{host.admin}", "--shutdown-delay", str(SHUTDOWN_DELAY),
        "--graceful-timeout", "10", "--keep-alive", "75",  # as deploy/haproxy/haproxy.cfg says
        "--control", str(folder / f"{host.letter}{host.generation}.sock"),
        env={"FLEET_NAME": f"{host.letter}{host.generation}", "PYTHONDONTWRITEBYTECODE": "1"}, cwd=folder)
    host.cmd = cmd
    return cmd


def track(cmd: Cmd, stop: threading.Event) -> None:
    """Remember every worker pid, so that the teardown can end each one (they have their own sessions)."""
    while not stop.is_set() and cmd.proc.poll() is None:
        cmd.worker_pids.update(children(cmd.proc.pid))
        time.sleep(0.1)


# -- the load -----------------------------------------------------------------------------------------

@dataclass
class Load:
    port: int
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    served: list[tuple[float, str]] = field(default_factory=list)  # (when, instance)
    errors: list[tuple[float, str]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, limit: float = 120.0) -> None:
        until = time.monotonic() + limit  # the clients stop by themselves, whatever the test does
        for i in range(CLIENTS):
            t = threading.Thread(target=self._client, args=(i, until), daemon=True)
            t.start()
            self.threads.append(t)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(CLIENT_TIMEOUT + 5)

    def counts(self, since: float = 0.0) -> Counter[str]:
        with self.lock:
            return Counter(name for when, name in self.served if when >= since)

    def _client(self, i: int, until: float) -> None:
        n = 0
        while not self.stop.is_set() and time.monotonic() < until:
            n += 1
            keep = (i + n) % 2 == 0  # half the connections carry 20 requests, half only one
            count = 20 if keep else 1
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=CLIENT_TIMEOUT) as sock, \
                        sock.makefile("rb") as reader:
                    for k in range(count):
                        if self.stop.is_set():
                            break
                        path = "/slow" if (n + k) % 5 == 0 else "/"
                        name = _get(sock, reader, path, close=k == count - 1)
                        with self.lock:
                            self.served.append((time.monotonic(), name))
            except (OSError, ValueError) as exc:
                with self.lock:
                    self.errors.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))


def _get(sock: socket.socket, reader, path: str, close: bool) -> str:
    """One GET through HAProxy; the name of the instance that answered (a ValueError if incomplete)."""
    head = f"GET {path} HTTP/1.1\r\nHost: fleet\r\n" + ("Connection: close\r\n" if close else "")
    sock.sendall((head + "\r\n").encode())
    line = reader.readline(1024)
    if not line:
        raise ValueError("connection closed before the status line")
    if line.split()[1:2] != [b"200"]:
        raise ValueError(f"status line {line!r}")
    length = None
    while (h := reader.readline(8192)) not in (b"\r\n", b"\n"):
        if not h:
            raise ValueError("connection closed in the headers")
        name, _, value = h.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise ValueError("no content-length")
    body = reader.read(length)
    if len(body) != length or not re.fullmatch(rb"[AB]\d", body):
        raise ValueError(f"bad body {body!r}")
    return body.decode()


# -- the test -----------------------------------------------------------------------------------------

@pytest.mark.timeout(400)  # installing HAProxy may take minutes; the roll itself takes about 30 s
def test_rolling_deploy_through_haproxy_loses_no_request(prefork_cmd, tmp_path):  # noqa: F811
    if not (ROOT / "src" / "prefork" / "admin.py").exists():
        pytest.skip("the admin endpoint (src/prefork/admin.py, --admin) is not there")
    binary = find_haproxy()
    (tmp_path / "app.py").write_text(APP)
    hosts = [Host("host1", "A"), Host("host2", "B")]
    watching = threading.Event()
    for host in hosts:
        start(prefork_cmd, tmp_path, host)
    for host in hosts:
        assert wait_until(lambda h=host: h.readyz() == 200, 30), host.cmd.output
        threading.Thread(target=track, args=(host.cmd, watching), daemon=True).start()
    lb_port = free_port()
    lb = HAProxy(binary, tmp_path, lb_port, [(h.port, h.admin) for h in hosts])
    load = Load(lb_port)
    notes: list[str] = []
    t0 = time.monotonic()
    try:
        assert wait_until(lambda: lb.servers() == {"host1": "UP", "host2": "UP"}, 15), \
            f"{lb.servers()}\n{lb.tail()}"
        load.start()
        assert wait_until(lambda: min(load.counts()[f"{h.letter}1"] for h in hosts) >= 50, 20), load.counts()
        for host in hosts:
            old = host.cmd
            old.proc.send_signal(signal.SIGTERM)
            termed = time.monotonic()
            # HAProxy must see the 503 and take the host out while the host still serves
            assert wait_until(lambda h=host: lb.servers().get(h.label, "").startswith("DOWN"), 15), \
                lb.servers()
            down = time.monotonic() - termed
            assert old.proc.poll() is None, f"{host.label} exited before HAProxy marked it down\n{old.output}"
            assert old.finish(30) == 0, old.output
            exited = time.monotonic() - termed
            assert wait_until(lambda c=old: not any(pid_alive(p) for p in c.worker_pids), 15), old.worker_pids
            start(prefork_cmd, tmp_path, host)
            threading.Thread(target=track, args=(host.cmd, watching), daemon=True).start()
            assert wait_until(lambda h=host: h.readyz() == 200, 30), host.cmd.output
            assert wait_until(lambda h=host: lb.servers().get(h.label) == "UP", 15), lb.servers()
            notes.append(f"{host.label}: DOWN in HAProxy {down:.2f} s after SIGTERM, exited after "
                         f"{exited:.2f} s, replacement UP after {time.monotonic() - termed:.2f} s")
        rolled = time.monotonic()
        assert wait_until(lambda: min(load.counts(rolled)[f"{h.letter}2"] for h in hosts) >= 50, 20), \
            load.counts(rolled)
        load.finish()
        backend = lb.stat()["BACKEND"]
    finally:
        load.finish()
        watching.set()
        lb.close()
        # the roll is over: the last instances drain at once (SIGINT), not after their shutdown delay
        # as SIGTERM in the teardown would (4 s each, one after the other)
        last = [h.cmd.proc for h in hosts if h.cmd is not None and h.cmd.proc.poll() is None]
        for proc in last:
            proc.send_signal(signal.SIGINT)
        for proc in last:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass  # the teardown ends it
    total = load.counts()
    retried = {k: int(backend[k] or 0) for k in ("wretr", "wredis")}
    print(f"\n{sum(total.values())} requests in {time.monotonic() - t0:.1f} s, by instance {dict(total)}, "
          f"HAProxy retries {retried}; " + "; ".join(notes))
    assert not load.errors, f"{len(load.errors)} failed: {load.errors[:10]}\n{lb.tail()}"
    # HAProxy's retries are a safety net; with the shutdown delay no request needed one: every host was
    # out of rotation before it stopped serving
    assert retried == {"wretr": 0, "wredis": 0}, f"HAProxy retried: {retried}\n{lb.tail()}"
    for name in ("A1", "B1", "A2", "B2"):  # both hosts served before the roll and after it
        assert total[name] >= 50, total


@pytest.mark.skipif(not os.environ.get("FLEET_UVICORN"), reason="measures a peer, for deploy/README.md: "
                    "FLEET_UVICORN=1 runs it")
@pytest.mark.timeout(400)
def test_the_same_roll_with_uvicorn_fails_requests(tmp_path):
    """The roll above with `uvicorn --workers 2` on each host: no readiness endpoint (HAProxy checks
    GET / on the app port), no shutdown delay, and HAProxy's retries off (retry-on none), so that the
    failures are the server's, not hidden by the load balancer."""
    binary = find_haproxy()
    (tmp_path / "app.py").write_text(APP)
    hosts = [Host("host1", "A"), Host("host2", "B")]
    procs: list[subprocess.Popen] = []

    def start_uvicorn(host: Host) -> subprocess.Popen:
        host.generation += 1
        procs.append(subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "uvicorn"), "app:app", "--workers", "2", "--port", str(host.port),
             "--log-level", "warning"], cwd=tmp_path, stdin=subprocess.DEVNULL, start_new_session=True,
            env=clean_env({"FLEET_NAME": f"{host.letter}{host.generation}"})))
        return procs[-1]

    def answers(host: Host) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{host.port}/", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def edit(text: str) -> str:
        edited = text.replace("GET /readyz", "GET /").replace("retry-on conn-failure empty-response",
                                                               "retry-on none")
        assert edited.count("GET /readyz") == 0 and "retry-on none" in edited
        return edited

    running = {h.label: start_uvicorn(h) for h in hosts}
    for host in hosts:
        assert wait_until(lambda h=host: answers(h), 30)
    lb_port = free_port()
    lb = HAProxy(binary, tmp_path, lb_port, [(h.port, h.port) for h in hosts], edit)
    load = Load(lb_port)
    try:
        assert wait_until(lambda: lb.servers() == {"host1": "UP", "host2": "UP"}, 15), lb.tail()
        load.start()
        assert wait_until(lambda: min(load.counts()[f"{h.letter}1"] for h in hosts) >= 50, 20), load.counts()
        for host in hosts:
            running[host.label].send_signal(signal.SIGTERM)
            running[host.label].wait(30)
            running[host.label] = start_uvicorn(host)
            assert wait_until(lambda h=host: answers(h), 30)
            assert wait_until(lambda h=host: lb.servers().get(h.label) == "UP", 15), lb.servers()
        time.sleep(1)
    finally:
        load.finish()
        lb.close()
        for proc in procs:  # uvicorn's workers are in its process group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
    kinds = Counter(error for _, error in load.errors)
    print(f"\nuvicorn: {len(load.errors)} of {sum(load.counts().values()) + len(load.errors)} requests "
          f"failed: {kinds.most_common(4)}")
    assert load.errors, "uvicorn's roll lost nothing: deploy/README.md says otherwise"
