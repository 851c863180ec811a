"""systemd integration with the real tools: socket activation through `systemd-socket-activate`,
`--bind fd://N`, and the notify protocol on a real datagram socket (a path and an abstract name).

`systemd-socket-activate -l ADDR CMD` binds ADDR, waits for the first connection, then execs CMD
with the socket as descriptor 3 and LISTEN_PID/LISTEN_FDS set: so each test connects first, and that
first request must be answered once prefork is up (it waits in the inherited socket's queue).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from cli_helpers import PREFORK, ctl_json, free_port, pid_alive, run_prefork
from conftest import wait_until
from wrapped import Wrapped

pytestmark = pytest.mark.timeout(120)
APP = "tests.apps.ops:app"
MANAGER_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                "WATCHDOG_PID")


@pytest.fixture
def started():
    """Wrapped commands started by a test; each (and its workers) is stopped on teardown."""
    cmds: list[Wrapped] = []
    yield cmds
    for cmd in cmds:
        cmd.kill_all()
    for cmd in cmds:
        for pid in cmd.worker_pids:
            assert not pid_alive(pid), f"worker pid {pid} survived its primary"


def _environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = f.read().split(b"\0")
    return dict(i.decode("utf-8", "replace").partition("=")[::2] for i in items if b"=" in i)


def _stop(cmd: Wrapped, control: str) -> None:
    cmd.track_workers(control)
    os.kill(cmd.proc.pid, signal.SIGTERM)
    assert cmd.finish() == 0, cmd.output


# -- socket activation -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["none", "rr", "reuseport"])
@pytest.mark.parametrize("preload", [False, True], ids=["spawn", "preload"])
def test_socket_activation(started, tmp_path, policy, preload):
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate is not installed (Debian: apt-get install systemd)")
    port, control = free_port(), str(tmp_path / "ctl.sock")
    args = ["serve", APP, "--workers", "2", "--policy", policy, "--control", control,
            "--bind", "127.0.0.1:1"]  # ignored: the passed socket replaces the --bind addresses
    if preload:
        args.append("--preload")
    cmd = Wrapped(["systemd-socket-activate", "-l", f"127.0.0.1:{port}"], args)
    started.append(cmd)
    cmd.expect(rf"Listening on 127\.0\.0\.1:{port}", 15)
    first: list[object] = []
    client = threading.Thread(target=lambda: first.append(_get(port, "/")), daemon=True)
    client.start()  # systemd-socket-activate starts prefork on this first connection
    cmd.wait_ready(30)
    client.join(30)
    assert first and isinstance(first[0], httpx.Response) and first[0].status_code == 200, (first, cmd.output)
    cmd.expect(rf"listening +fd://3 \(systemd socket activation, 127\.0\.0\.1:{port}\)")
    status = ctl_json(control)
    cmd.worker_pids.update(w["pid"] for w in status["workers"])
    if policy == "reuseport":
        assert status["policy"] == "rr", status
        fallback = [line for line in cmd.output.splitlines() if "reuseport" in line and "inherited" in line]
        assert len(fallback) == 1 and "using rr" in fallback[0], cmd.output
    else:
        assert status["policy"] == policy and "reuseport cannot" not in cmd.output, cmd.output
    for _ in range(20):
        assert _get(port, "/").text.startswith("hello from ")
    if policy != "none":  # the primary accepts: no worker holds the listening socket (forked ones too)
        listening = os.readlink(f"/proc/{cmd.proc.pid}/fd/3")  # systemd-socket-activate exec'd prefork
        assert listening.startswith("socket:"), listening
        for pid in cmd.worker_pids:
            held = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            assert listening not in held, (pid, listening)
    for _ in range(4):  # what a worker's app sees (forked workers too), and its exec-time environment
        seen = _get(port, "/env").json()
        assert seen["vars"] == {}, seen
        if not preload:
            assert not set(MANAGER_VARS) & set(_environ_of(seen["pid"])), seen
    _stop(cmd, control)


def _get(port: int, path: str) -> httpx.Response:
    with httpx.Client(timeout=30) as client:
        return client.get(f"http://127.0.0.1:{port}{path}", headers={"Connection": "close"})


def test_bind_fd_serves_a_passed_socket(started, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port, fd, control = listener.getsockname()[1], listener.fileno(), str(tmp_path / "ctl.sock")
    try:
        cmd = Wrapped([], ["serve", APP, "--workers", "2", "--policy", "rr", "--bind", f"fd://{fd}",
                           "--control", control], pass_fds=(fd,))
    finally:
        listener.close()  # prefork holds its own copy now
    started.append(cmd)
    cmd.wait_ready(30)
    cmd.expect(rf"listening +fd://{fd} \(inherited, 127\.0\.0\.1:{port}\)")
    pids = {int(_get(port, "/").text.split()[-1]) for _ in range(20)}
    assert len(pids) == 2, pids  # rr: both workers took turns on the one inherited socket
    _stop(cmd, control)


@pytest.mark.parametrize("kind", ["file", "closed", "udp", "not-listening", "activation-count"])
def test_unusable_descriptor_is_one_line_and_exit_2(tmp_path, kind):
    import subprocess

    from cli_helpers import ROOT, clean_env

    keep: list[object] = []
    fd, env, expected = 0, {}, ""
    if kind == "file":
        f = open(tmp_path / "plain.txt", "w")  # noqa: SIM115 - closed below
        keep.append(f)
        fd, expected = f.fileno(), "not a socket (a regular file)"
    elif kind == "closed":
        fd, expected = 900, "no such descriptor is open"
    elif kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        keep.append(s)
        fd, expected = s.fileno(), "not a stream socket"
    elif kind == "not-listening":
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        keep.append(s)
        fd, expected = s.fileno(), "not listening"
    argv = [PREFORK, "serve", APP, "--bind", f"fd://{fd}", "--control", str(tmp_path / "ctl.sock")]
    if kind == "activation-count":  # LISTEN_PID must be prefork's own pid: exec through a shell
        argv = ["sh", "-c", f'LISTEN_PID=$$ LISTEN_FDS=lots exec {PREFORK} serve {APP} '
                f'--control {tmp_path / "ctl.sock"}']
        expected = "LISTEN_FDS='lots'"
    try:
        result = subprocess.run(argv, cwd=ROOT, env=clean_env(env), capture_output=True, text=True,
                                timeout=30, pass_fds=(fd,) if fd > 2 and kind != "closed" else ())
    finally:
        for item in keep:
            item.close()  # type: ignore[attr-defined]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2, result
    assert len(lines) == 1 and expected in lines[0], lines


def test_listen_pid_of_another_process_is_ignored(tmp_path):
    """LISTEN_* meant for another pid (prefork started by a program that got them) are not ours."""
    port, control = free_port(), str(tmp_path / "ctl.sock")
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    cmd = Wrapped([], ["serve", APP, "--workers", "1", "--bind", f"127.0.0.1:{port}", "--control", control],
                  env=env)
    try:
        cmd.wait_ready(30)
        assert _get(port, "/env").json()["vars"] == {}
        _stop(cmd, control)
    finally:
        cmd.kill_all()


# -- sd_notify ---------------------------------------------------------------------------------------


class NotifySocket:
    """A datagram socket as systemd's: collects what prefork sends, with the time it came."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._open = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._open:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._open = False
        self._thread.join(2)
        self.sock.close()

    def lines(self) -> list[str]:
        return [line for _, m in list(self.messages) for line in m.split("\n")]

    def wait_for(self, line: str, after: int = 0, timeout: float = 30) -> int:
        """The index (in lines()) of the first `line` at or after `after`."""
        found: list[int] = []

        def seen() -> bool:
            lines = self.lines()
            found[:] = [i for i in range(after, len(lines)) if lines[i] == line][:1]
            return bool(found)

        assert wait_until(seen, timeout), f"no {line!r} after line {after}: {self.lines()}"
        return found[0]


@pytest.mark.parametrize("where", ["path", "abstract"])
def test_notify_ready_watchdog_reload_stop(tmp_path, where):
    if where == "path":
        address: str | bytes = str(tmp_path / "notify.sock")
        env_value = str(address)
    else:
        name = f"prefork-test-{uuid.uuid4().hex}"
        address, env_value = b"\0" + name.encode(), "@" + name
    notify = NotifySocket(address)
    control, port = str(tmp_path / "ctl.sock"), free_port()
    env = {"NOTIFY_SOCKET": env_value, "WATCHDOG_USEC": "1000000"}
    cmd = Wrapped([], ["serve", APP, "--workers", "2", "--bind", f"127.0.0.1:{port}", "--control", control],
                  env=env)
    try:
        ready = notify.wait_for("READY=1")
        lines = notify.lines()
        assert "STATUS=2 of 2 worker(s) ready" in lines[ready:ready + 2], lines
        ping = notify.wait_for("WATCHDOG=1", notify.wait_for("WATCHDOG=1", ready) + 1)  # two pings
        assert not [line for line in lines[:ready] if line == "WATCHDOG=1"], lines
        cmd.track_workers(control)
        for pid in cmd.worker_pids:  # workers must not notify: they do not know where
            assert not set(MANAGER_VARS) & set(_environ_of(pid)), pid
        assert _get(port, "/env").json()["vars"] == {}
        before_reload = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        result = run_prefork(["ctl", "--control", control, "reload"])
        assert result.returncode == 0, result
        reloading = notify.wait_for("RELOADING=1", ping)
        stamp = notify.lines()[reloading + 1]
        m = re.fullmatch(r"MONOTONIC_USEC=(\d+)", stamp)
        assert m and before_reload <= int(m[1]) <= before_reload + 30_000_000, stamp
        ready_again = notify.wait_for("READY=1", reloading)
        assert notify.lines()[ready_again + 1].startswith("STATUS=reload done; "), notify.lines()
        cmd.track_workers(control)
        os.kill(cmd.proc.pid, signal.SIGTERM)
        assert cmd.finish() == 0, cmd.output
        notify.wait_for("STOPPING=1", ready_again)
        stamps = [t for t, m in notify.messages if m == "WATCHDOG=1"]  # every 0.5 s, half of WATCHDOG_USEC
        assert 2 <= len(stamps) <= (stamps[-1] - stamps[0]) / 0.5 + 3, stamps  # not more often than that
    finally:
        cmd.kill_all()
        notify.close()
    assert "cannot notify" not in cmd.output


def test_no_watchdog_before_a_worker_is_ready(tmp_path):
    """Pings say "a worker serves": none while the app is still starting (here for 2 s), though the
    interval (0.1 s) would have allowed 20."""
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    control, port = str(tmp_path / "ctl.sock"), free_port()
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000", "APP_START_DELAY": "2"}
    cmd = Wrapped([], ["serve", APP, "--workers", "1", "--bind", f"127.0.0.1:{port}", "--control", control],
                  env=env)
    try:
        ready = notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", ready)
        assert "WATCHDOG=1" not in notify.lines()[:ready], notify.lines()
        # the only worker dies: while its replacement imports the app (2 s), no worker is ready and
        # no ping may go out, though the loop runs; they resume once the replacement is ready
        old = cmd.track_workers(control)
        os.kill(old[0], signal.SIGKILL)
        killed = time.monotonic()
        assert wait_until(lambda: ctl_json(control)["workers"][0]["pid"] != old[0], 20)
        assert wait_until(lambda: ctl_json(control)["workers"][0]["state"] == "ready", 30)
        # the replacement was forked after the death was seen and sleeps 2 s at import: from 0.5 s
        # after the kill (time for the primary to see it) to 1.8 s, no worker could be ready
        pings = [t - killed for t, m in list(notify.messages) if m == "WATCHDOG=1"]
        assert not [t for t in pings if 0.5 < t < 1.8], pings
        later = lambda: [t for t, m in list(notify.messages) if m == "WATCHDOG=1" and t > killed + 1.8]
        assert wait_until(later, 10), pings  # and they came back
        _stop(cmd, control)
    finally:
        cmd.kill_all()
        notify.close()


def test_sigterm_while_starting_with_a_delay_sends_no_ready(tmp_path):
    """A stop that begins before the first workers are ready: STOPPING=1, never a READY=1 after it."""
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    control, port = str(tmp_path / "ctl.sock"), free_port()
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "APP_START_DELAY": "2"}
    cmd = Wrapped([], ["serve", APP, "--workers", "1", "--bind", f"127.0.0.1:{port}", "--control", control,
                       "--shutdown-delay", "4"], env=env)
    try:
        assert wait_until(lambda: os.path.exists(control) and ctl_json(control)["workers"], 20)
        os.kill(cmd.proc.pid, signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert cmd.finish(30) == 0, cmd.output
        assert "READY=1" not in notify.lines(), notify.lines()
        assert "ready: 1 worker" not in cmd.output
    finally:
        cmd.kill_all()
        notify.close()


def test_watchdog_pings_stop_while_the_primary_is_stopped(tmp_path):
    """A primary whose loop does not run sends nothing: SIGSTOP it for a while, no ping in between."""
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    control, port = str(tmp_path / "ctl.sock"), free_port()
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"}
    cmd = Wrapped([], ["serve", APP, "--workers", "1", "--bind", f"127.0.0.1:{port}", "--control", control],
                  env=env)
    try:
        ready = notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", ready)
        os.kill(cmd.proc.pid, signal.SIGSTOP)
        time.sleep(0.5)  # pings already sent have arrived
        stopped_at = time.monotonic()
        time.sleep(1.0)
        during = [t for t, m in notify.messages if m == "WATCHDOG=1" and t > stopped_at]
        os.kill(cmd.proc.pid, signal.SIGCONT)
        assert during == [], during
        pings = len(notify.lines())
        assert wait_until(lambda: "WATCHDOG=1" in notify.lines()[pings:], 10), "no ping after SIGCONT"
        _stop(cmd, control)
    finally:
        cmd.kill_all()
        notify.close()


def test_unreachable_notify_socket_is_not_fatal(tmp_path):
    control, port = str(tmp_path / "ctl.sock"), free_port()
    env = {"NOTIFY_SOCKET": str(tmp_path / "nobody-here.sock")}
    cmd = Wrapped([], ["serve", APP, "--workers", "1", "--bind", f"127.0.0.1:{port}", "--control", control],
                  env=env)
    try:
        cmd.wait_ready(30)
        assert _get(port, "/").status_code == 200
        _stop(cmd, control)
        assert len([line for line in cmd.output.splitlines() if "cannot notify systemd" in line]) == 1, \
            cmd.output
    finally:
        cmd.kill_all()


def test_deploy_units_verify(tmp_path):
    """deploy/systemd/ passes `systemd-analyze verify` (it needs no running systemd). A copy is
    verified, with ExecStart= pointing at this checkout's prefork (the unit's /srv/app path does not
    exist here); systemd older than 253 knows neither Type=notify-reload nor ReloadSignal=, so there
    the copy says Type=notify and the rest is verified."""
    import subprocess

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    units = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
    service = (units / "prefork.service").read_text()
    for setting in ("Type=notify-reload", "WatchdogSec=", "KillMode=mixed", "TimeoutStopSec=", "User=",
                    "Requires=prefork.socket"):
        assert setting in service, setting
    version = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"systemd (\d+)", version)
    copy = service.replace("/srv/app/.venv/bin/prefork", str(Path(PREFORK)))
    if m and int(m[1]) < 253:
        copy = copy.replace("Type=notify-reload", "Type=notify")
        copy = "\n".join(line for line in copy.splitlines() if not line.startswith("ReloadSignal="))
    (tmp_path / "prefork.service").write_text(copy)
    (tmp_path / "prefork.socket").write_text((units / "prefork.socket").read_text())
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "prefork.socket"),
                             str(tmp_path / "prefork.service")], capture_output=True, text=True, timeout=60)
    said = result.stdout + result.stderr
    assert result.returncode == 0 and not said.strip(), said


# -- the variables, read as sd_listen_fds and sd_notify read them ---------------------------------------


def test_listen_fds_reads_and_removes_the_variables():
    from prefork import activation

    env = {"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:admin", "OTHER": "x"}
    assert activation.listen_fds(env, pid=4242) == [(3, "web"), (4, "admin")]
    assert env == {"OTHER": "x"}
    env = {"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "only-one"}
    assert activation.listen_fds(env, pid=4242) == [(3, None), (4, None)]  # names must match the count
    env = {"LISTEN_PID": "999", "LISTEN_FDS": "1"}
    assert activation.listen_fds(env, pid=4242) is None and env == {}  # another process's: gone anyway
    assert activation.listen_fds({"LISTEN_FDS": "1"}, pid=4242) is None
    assert activation.listen_fds({"LISTEN_PID": "4242", "LISTEN_FDS": "0"}, pid=4242) == []
    for bad in ("-1", "x", "100000"):
        with pytest.raises(activation.ActivationError, match="LISTEN_FDS"):
            activation.listen_fds({"LISTEN_PID": "4242", "LISTEN_FDS": bad}, pid=4242)


def test_notify_addresses_and_watchdog_variables():
    from prefork import sdnotify

    assert sdnotify.socket_address("@abc") == b"\0abc"
    assert sdnotify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    logged: list[str] = []
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = sdnotify.from_environ(None, logged.append, env)
    assert notifier is not None and notifier.watchdog_s == 3.0 and env == {}
    notifier = sdnotify.from_environ(None, logged.append, {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "5",
                                                           "WATCHDOG_PID": "1"})
    assert notifier is not None and notifier.watchdog_s is None  # another process's watchdog
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "soon"}
    notifier = sdnotify.from_environ(None, logged.append, env)
    assert notifier is not None and notifier.watchdog_s is None and "WATCHDOG_USEC" in logged[-1]
    assert sdnotify.from_environ(None, logged.append, {}) is None


def test_help_documents_fd_binds_and_init():
    """`serve --help` says what fd://N and --init do (and prints at all: a % in a help text, as in
    --access-log-format's, made argparse fail with KeyError)."""
    result = run_prefork(["serve", "--help"])
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "fd://N" in text and "LISTEN_FDS" in text and "PR_SET_CHILD_SUBREAPER" in text, text


def test_notify_a_failed_reload_ends_with_ready(tmp_path):
    """A reload whose new workers cannot start still ends the reload job (READY=1: the old workers
    serve on), and STATUS says it failed."""
    app = tmp_path / "notify_app.py"
    app.write_text("from tests.apps.ops import app\n")
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    control, port = str(tmp_path / "ctl.sock"), free_port()
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "PYTHONPATH": str(tmp_path)}
    cmd = Wrapped([], ["serve", "notify_app:app", "--workers", "1", "--bind", f"127.0.0.1:{port}",
                       "--control", control], env=env)
    try:
        ready = notify.wait_for("READY=1")
        app.write_text("raise RuntimeError('broken on purpose')\n")
        assert run_prefork(["ctl", "--control", control, "reload"]).returncode == 0
        reloading = notify.wait_for("RELOADING=1", ready)
        done = notify.wait_for("READY=1", reloading)
        assert notify.lines()[done + 1].startswith("STATUS=reload failed ("), notify.lines()
        assert _get(port, "/").status_code == 200  # the old worker serves on
        _stop(cmd, control)
    finally:
        cmd.kill_all()
        notify.close()
