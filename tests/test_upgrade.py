"""Hot upgrade of the primary (`prefork ctl upgrade`, SIGUSR2; src/prefork/upgrade.py), with real
primaries: under keep-alive and new-connection load no request fails, the old primary exits 0, the
new one answers on the same control socket and serves the same sockets (the unix socket's file and
the control socket's file are still there); a new command line changes the app and the worker
count; a new primary that fails (a bad flag, a broken app, not ready in time) leaves the old one
serving, with the reason in the ctl answer, in its log and in `ctl status`."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import ctl_json, free_port, pid_alive, prefork_cmd, run_prefork  # noqa: F401
from conftest import children, wait_until

from prefork import control as control_client


class Load:
    """Client threads on 127.0.0.1, half on keep-alive connections, half opening one per request."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port, self.ok, self.errors = port, 0, []
        self.bodies: set[str] = set()
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i % 2 == 0,), daemon=True)
                         for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def _run(self, keep_alive: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10) if keep_alive else None
        while not self._stop.is_set():
            c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:  # a `Connection: close` answer makes http.client reconnect for the next one
                c.request("GET", "/", headers={} if conn else {"Connection": "close"})
                reply = c.getresponse()
                body = reply.read().decode()
                with self._lock:
                    if reply.status == 200:
                        self.ok += 1
                        self.bodies.add(body)
                    else:
                        self.errors.append(f"status {reply.status}")
            except Exception as exc:  # counted: the tests assert there are none
                with self._lock:
                    self.errors.append(f"{'keep-alive' if conn else 'new'}: {exc!r}")
                if conn is not None:
                    conn.close()
            finally:
                if conn is None:
                    c.close()
            time.sleep(0.002)


class Probe:
    """A load balancer's health check: GET /readyz on the admin port every 20 ms; every answer that is
    not 200, or no answer, is noted."""

    def __init__(self, admin: int) -> None:
        self.admin, self.ok, self.bad = admin, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                body = get_path(self.admin, "/readyz")
            except Exception as exc:
                self.bad.append(repr(exc))
                continue
            self.ok += body == "ready\n"
            if body != "ready\n":
                self.bad.append(body)


def start(prefork_cmd, tmp_path: Path, *extra: str, env: dict[str, str] | None = None):  # noqa: F811
    port, unix, control = free_port(), str(tmp_path / "app.sock"), str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", "tests.apps.hello:asgi", "--workers", "2", "--bind", f"127.0.0.1:{port}",
                      "--bind", f"unix:{unix}", "--control", control, *extra, env=env)
    cmd.wait_ready()
    cmd.track_workers(control)
    return cmd, port, unix, control


def upgrade(control: str, *args: str):
    return run_prefork(["ctl", "--control", control, "upgrade", *(["--", *args] if args else [])], timeout=60)


def new_pid(text: str) -> int:
    found = re.search(r"upgraded: new primary pid (\d+)", text)
    assert found, text
    return int(found[1])


def get(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def get_unix(path: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode().split("\r\n\r\n", 1)[1]


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def end_upgrades(cmd) -> None:
    """Every new primary this primary started (its log names each), whatever the test reached."""
    end_tree(*{int(pid) for pid in re.findall(r"upgrading: new primary pid (\d+)", cmd.output)})


def end_tree(*pids: int | None) -> None:
    """Stop primaries this test did not start itself (a new primary is not our child), and every
    process under them, by pid."""
    for pid in [p for p in pids if p]:
        tree = descendants(pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        wait_until(lambda pid=pid: not pid_alive(pid), 15)
        for each in [pid, *tree, *descendants(pid)]:
            try:
                os.kill(each, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert wait_until(lambda tree=tree: not any(pid_alive(p) for p in tree), 10)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("extra", [[], ["--policy", "rr", "--no-preload"]], ids=["reuseport", "rr"])
def test_upgrade_under_load_fails_no_request(prefork_cmd, tmp_path: Path, extra: list[str]) -> None:  # noqa: F811
    """reuseport (with serve's default, preloading templates): every SO_REUSEPORT socket of the group
    is passed (closing one would reset what is queued on it); rr (workers as fresh interpreters): the
    one listening socket."""
    admin = free_port()
    cmd, port, unix, control = start(prefork_cmd, tmp_path, *extra, "--admin", f"127.0.0.1:{admin}")
    policy = ctl_json(control)["policy"]
    assert policy == ("rr" if "rr" in extra else "reuseport")
    # 3 workers now, 2 on the command line: the new primary's 2 workers serve the group's 3 sockets
    assert run_prefork(["ctl", "--control", control, "scale", "3"]).returncode == 0
    assert wait_until(lambda: [w["state"] for w in ctl_json(control)["workers"]] == ["ready"] * 3, 20)
    cmd.track_workers(control)
    new = None
    try:
        with Load(port) as load, Probe(admin) as probe:
            assert wait_until(lambda: load.ok >= 100, 20)
            before = load.ok
            result = upgrade(control)
            assert result.returncode == 0, result.stdout + result.stderr + cmd.output
            new = new_pid(result.stdout)
            assert cmd.finish(30) == 0  # the old primary drained its workers and exited 0
            during = load.ok - before
            assert wait_until(lambda: load.ok >= before + during + 100, 20)
        assert load.errors == [], load.errors[:5]
        assert load.bodies == {"hello world\n"}
        # the admin socket too: the new primary answers only once ready, the old one not once draining
        assert probe.bad == [] and probe.ok > 10, probe.bad[:5]
        assert json.loads(get_path(admin, "/status"))["pid"] == new
        print(f"\nupgrade under load ({policy}): {load.ok} requests, {len(load.errors)} failed")
        cmd.expect(rf"127\.0\.0\.1:{port} \(from the previous primary, pid {cmd.proc.pid}\)")
        status = ctl_json(control)  # the same control path, now the new primary's
        assert status["pid"] == new and status["policy"] == policy
        assert len(status["workers"]) == 2
        assert not pid_alive(cmd.proc.pid)
        assert os.path.exists(unix) and os.path.exists(control)  # no file of a served socket deleted
        assert get(port) == "hello world\n" and get_unix(unix) == "hello world\n"
    finally:
        end_upgrades(cmd)


@pytest.mark.timeout(90)
def test_a_new_command_line_changes_the_app_and_workers_then_sigusr2(prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    """--pid: each new primary writes its pid; the old one, on exit, leaves the file that names another."""
    pid_file = tmp_path / "prefork.pid"
    cmd, port, unix, control = start(prefork_cmd, tmp_path, "--pid", str(pid_file))
    assert pid_file.read_text().strip() == str(cmd.proc.pid)
    second = third = None
    try:
        result = upgrade(control, "serve", "tests.apps.upgraded:app", "--workers", "3", "--bind",
                         f"127.0.0.1:{port}", "--bind", f"unix:{unix}", "--control", control, "--pid",
                         str(pid_file))
        assert result.returncode == 0, result.stdout + result.stderr + cmd.output
        second = new_pid(result.stdout)
        assert cmd.finish(30) == 0
        assert pid_file.read_text().strip() == str(second)
        status = ctl_json(control)
        assert status["pid"] == second and len(status["workers"]) == 3
        assert get(port) == "upgraded\n" and get_unix(unix) == "upgraded\n"
        os.kill(second, signal.SIGUSR2)  # again, with the second primary's own command line
        assert wait_until(lambda: ctl_json(control)["pid"] != second, 30), cmd.output
        third = ctl_json(control)["pid"]
        cmd.expect(rf"SIGUSR2: upgrading: new primary pid {third}")
        cmd.expect(rf"upgraded: new primary pid {third} is ready")
        assert wait_until(lambda: not pid_alive(second), 30)
        assert len(ctl_json(control)["workers"]) == 3 and get(port) == "upgraded\n"
        assert pid_file.read_text().strip() == str(third)
    finally:
        end_tree(third)  # started by the second, which logs into the same output
        end_upgrades(cmd)


@pytest.mark.timeout(90)
def test_a_failing_new_primary_leaves_the_old_one_serving(prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    pid_file = tmp_path / "prefork.pid"
    cmd, port, unix, control = start(prefork_cmd, tmp_path, "--pid", str(pid_file))
    old = cmd.proc.pid
    bad_flag = upgrade(control, "serve", "tests.apps.hello:asgi", "--no-such-flag")
    assert bad_flag.returncode == 1
    assert ("upgrade failed, still serving: the new primary exited with code 2: prefork: error: "
            "unrecognized arguments: --no-such-flag") in bad_flag.stderr, bad_flag.stderr
    broken = upgrade(control, "serve", "tests.apps.broken:app", "--bind", f"127.0.0.1:{port}", "--bind",
                     f"unix:{unix}", "--control", control, "--pid", str(pid_file))
    assert broken.returncode == 1
    assert "upgrade failed, still serving: " in broken.stderr
    assert "No module named 'this_dependency_does_not_exist'" in broken.stderr, broken.stderr
    cmd.expect(r"upgrade failed, still serving: the new primary exited with code 2: .*--no-such-flag")
    cmd.expect(r"upgrade failed, still serving: .*this_dependency_does_not_exist")
    tried = [int(pid) for pid in re.findall(r"upgrading: new primary pid (\d+)", cmd.output)]
    assert len(tried) == 2
    assert wait_until(lambda: not any(pid_alive(pid) for pid in tried), 15)
    status = ctl_json(control)
    assert status["pid"] == old and status["upgrade"]["state"] == "failed"
    assert "this_dependency_does_not_exist" in status["upgrade"]["message"]
    assert "last upgrade: failed" in run_prefork(["ctl", "--control", control, "status"]).stdout
    assert get(port) == "hello world\n" and get_unix(unix) == "hello world\n"
    assert os.path.exists(unix) and os.path.exists(control)
    assert pid_file.read_text().strip() == str(old)
    # the request is checked where it comes in: an error answer, never a hang
    for args, why in (("serve", "non-empty list of strings"), ([1], "each argument must be a string"),
                      (["serve"] * 201, "at most 200 arguments"), (["x" * 5000], "at most 4096")):
        reply = control_client.request(control, {"cmd": "upgrade", "args": args})
        assert reply["ok"] is False and why in reply["error"], reply
    assert cmd.proc.poll() is None


@pytest.mark.timeout(90)
def test_a_new_primary_not_ready_in_time_is_killed_and_a_second_upgrade_is_refused(
        prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    gate = tmp_path / "gate"  # never made: the new primary's workers wait in their import
    pid_file = tmp_path / "prefork.pid"
    cmd, port, unix, control = start(prefork_cmd, tmp_path, "--ready-timeout", "4", "--pid", str(pid_file),
                                     env={"SLOW_START_GATE": str(gate)})  # the new one inherits it
    args = ["serve", "tests.apps.slow_start:app", "--bind", f"127.0.0.1:{port}", "--control", control,
            "--pid", str(pid_file), "--no-preload"]  # its primary runs (and writes its pid), its workers wait
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(upgrade(control, *args)))
    try:
        thread.start()
        trial = int(cmd.expect(r"upgrading: new primary pid (\d+)", 20)[1])
        assert wait_until(lambda: descendants(trial), 20)  # its workers, stuck importing
        assert wait_until(lambda: pid_file.read_text().strip() == str(trial), 20)  # it wrote its pid
        tree = descendants(trial)
        second = upgrade(control)
        assert second.returncode == 1 and "upgrade refused: an upgrade is already running" in second.stderr
        cmd.expect(r"ctl upgrade: upgrade refused: an upgrade is already running")
        thread.join(60)
        assert outcome and outcome[0].returncode == 1
        assert "upgrade failed, still serving: the new primary was not ready within 4 s" in outcome[0].stderr
        assert wait_until(lambda: not pid_alive(trial) and not any(pid_alive(p) for p in tree), 20)
        assert ctl_json(control)["pid"] == cmd.proc.pid and get(port) == "hello world\n"
        # killed, it removed the file naming it: the old primary writes its own pid again
        assert wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() == str(cmd.proc.pid), 10)
    finally:
        thread.join(60)
        end_upgrades(cmd)
    assert json.dumps(ctl_json(control)["upgrade"]).count("not ready within 4 s") == 1


RUN_SCRIPT = """
import sys
from http.server import BaseHTTPRequestHandler

import prefork


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "12")
        self.end_headers()
        self.wfile.write(b"hello world\\n")

    def log_message(self, *args):
        pass


prefork.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Hello).serve_forever()
"""


@pytest.mark.timeout(60)
def test_prefork_run_primary(prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    """`prefork run`: the script's listen() goes through the primary, so its socket is passed too."""
    script, port, control = tmp_path / "server.py", free_port(), str(tmp_path / "ctl.sock")
    script.write_text(RUN_SCRIPT)
    cmd = prefork_cmd("run", "--workers", "2", "--control", control, str(script), str(port))
    cmd.wait_ready()
    cmd.track_workers(control)
    try:
        with Load(port, threads=2) as load:
            assert wait_until(lambda: load.ok >= 50, 20)
            result = upgrade(control)
            assert result.returncode == 0, result.stdout + result.stderr + cmd.output
            assert cmd.finish(30) == 0
            done = load.ok
            assert wait_until(lambda: load.ok >= done + 50, 20)
        assert load.errors == [] and load.bodies == {"hello world\n"}, load.errors[:5]
        assert ctl_json(control)["pid"] == new_pid(result.stdout)
    finally:
        end_upgrades(cmd)


# -- under systemd: socket activation, the notify protocol, PID 1 ------------------------------------


class Notify:
    """A datagram socket as systemd's NOTIFY_SOCKET, noting which pid sent each line (SO_PASSCRED)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.lines: list[tuple[int, str]] = []
        self._open = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        size = socket.CMSG_SPACE(12)
        while self._open:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(4096, size)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = next((int.from_bytes(d[:4], "little") for level, kind, d in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), 0)
            self.lines += [(pid, line) for line in data.decode().split("\n")]

    def seen(self, pid: int, line: str) -> bool:
        return (pid, line) in list(self.lines)

    def close(self) -> None:
        self._open = False
        self._thread.join(2)
        self.sock.close()


@pytest.mark.timeout(90)
def test_under_systemd_socket_activation_and_notify(tmp_path: Path) -> None:
    """The socket systemd passed is served by the new primary in place of its --bind addresses (its
    command line has none); the old one says MAINPID=<new pid> and then nothing (no STOPPING=1:
    the service is not stopping); the new one is told where to notify and pings the watchdog, and
    its workers still see none of systemd's variables."""
    import shutil

    from wrapped import Wrapped

    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate is not installed (Debian: apt-get install systemd)")
    port, control, notify = free_port(), str(tmp_path / "ctl.sock"), Notify(str(tmp_path / "notify.sock"))
    cmd = Wrapped(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E", "NOTIFY_SOCKET", "-E",
                   "WATCHDOG_USEC"],  # it passes on only the variables named so
                  ["serve", "tests.apps.ops:app", "--workers", "2", "--control", control],
                  env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"})
    new = None
    try:
        cmd.expect(rf"Listening on 127\.0\.0\.1:{port}", 15)
        first = threading.Thread(target=get, args=(port,), daemon=True)
        first.start()  # systemd-socket-activate starts prefork on the first connection
        cmd.wait_ready(30)
        first.join(30)
        old = cmd.proc.pid  # systemd-socket-activate exec'd prefork
        assert wait_until(lambda: notify.seen(old, "READY=1"), 20), (old, notify.lines)
        cmd.track_workers(control)
        result = upgrade(control)
        assert result.returncode == 0, result.stdout + result.stderr + cmd.output
        new = new_pid(result.stdout)
        assert cmd.finish(30) == 0
        assert notify.seen(old, f"MAINPID={new}"), notify.lines
        assert not notify.seen(old, "STOPPING=1"), notify.lines
        assert wait_until(lambda: notify.seen(new, "WATCHDOG=1"), 20), notify.lines
        cmd.expect(rf"listening +fd://3 \(systemd socket activation, 127\.0\.0\.1:{port}\)")
        assert ctl_json(control)["pid"] == new
        for _ in range(4):
            assert json.loads(get_path(port, "/env"))["vars"] == {}
    finally:
        end_upgrades(cmd)  # first: it holds the output pipe, whose reader kill_all joins
        cmd.kill_all()
        notify.close()


def get_path(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        return conn.getresponse().read().decode()
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_refused_when_the_primary_is_pid_1(tmp_path: Path) -> None:
    """As a container's PID 1, the old primary's exit would end the container."""
    from test_pid1 import _unshare_works
    from wrapped import Wrapped

    why = _unshare_works()
    if why:
        pytest.skip(why)
    port, control = free_port(), str(tmp_path / "ctl.sock")
    cmd = Wrapped(["unshare", "--pid", "--fork", "--mount-proc"],
                  ["serve", "tests.apps.hello:asgi", "--workers", "1", "--bind", f"127.0.0.1:{port}",
                   "--control", control])
    try:
        cmd.wait_ready(30)
        assert re.search(r"pid\s+1\b", cmd.output), cmd.output
        result = upgrade(control)
        assert result.returncode == 1
        assert "upgrade refused: the primary is PID 1: its exit would end the container" in result.stderr
        cmd.expect(r"ctl upgrade: upgrade refused: the primary is PID 1")
        assert get(port) == "hello world\n"
        cmd.track_workers(control)
        assert run_prefork(["ctl", "--control", control, "stop", "--now"]).returncode == 0
        cmd.finish(20)  # unshare passes no SIGTERM on: kill_all would wait for it in vain
    finally:
        cmd.kill_all()


@pytest.mark.timeout(60)
def test_an_address_the_new_command_line_drops_is_closed(prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    """Adopted but unserved, the old port would queue connections nobody accepts: it is closed (a
    client is refused); the unix socket file is left where it is, never removed by the new primary."""
    cmd, port, unix, control = start(prefork_cmd, tmp_path)
    other = free_port()
    second = None
    try:
        result = upgrade(control, "serve", "tests.apps.hello:asgi", "--workers", "1", "--bind",
                         f"127.0.0.1:{other}", "--control", control)
        assert result.returncode == 0, result.stdout + result.stderr + cmd.output
        second = new_pid(result.stdout)
        assert cmd.finish(30) == 0
        assert get(other) == "hello world\n"
        cmd.expect(rf"upgrade: no longer serving .*127\.0\.0\.1:{port}")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert os.path.exists(unix)
    finally:
        end_tree(second)
        end_upgrades(cmd)
