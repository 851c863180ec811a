"""serve --preload: a template process per code version (src/prefork/versions.py).

Each test serves an app from a folder of its own, whose module says its version and records, at
import, the pid of every process that imported it, so the tests can tell who imported what.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cli_helpers import ctl_json, free_port, pid_alive, prefork_cmd, run_prefork  # noqa: F401

APP = '''
import os
with open(os.environ["IMPORTS_LOG"], "a") as f:
    f.write(f"{{os.getpid()}}\\n")
VERSION = "{version}"


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"{{VERSION}} {{os.getpid()}}".encode()
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]}})
    await send({{"type": "http.response.body", "body": body}})
'''


def _write(folder: Path, version: str, broken: bool = False) -> None:
    text = APP.format(version=version) + ("\ndef broken(:\n" if broken else "")
    (folder / "verapp.py").write_text(text)
    # the same size and second as the last version would let Python reuse a stale .pyc
    os.utime(folder / "verapp.py", (time.time() + 10, time.time() + 10))


def _until(check, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def served(prefork_cmd, tmp_path):  # noqa: F811
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    _write(app_dir, "v1")
    log = tmp_path / "imports.log"
    port, control = free_port(), str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", "verapp:app", "--preload", "--app-dir", str(app_dir), "--workers", "2",
                      "--bind", f"127.0.0.1:{port}", "--control", control,
                      env={"IMPORTS_LOG": str(log), "PYTHONDONTWRITEBYTECODE": "1"})
    cmd.wait_ready()
    cmd.track_workers(control)
    return cmd, port, control, app_dir, log


def _versions(port: int, n: int = 12) -> set[str]:
    seen = set()
    with httpx.Client(timeout=5) as client:
        for _ in range(n):
            seen.add(client.get(f"http://127.0.0.1:{port}/", headers={"connection": "close"}).text.split()[0])
    return seen


def _reload_state(control: str) -> str:
    return ctl_json(control)["reload"]["state"]


def _reload(control: str) -> str:
    assert run_prefork(["ctl", "--control", control, "reload"]).returncode == 0
    assert _until(lambda: _reload_state(control) in ("done", "failed")), ctl_json(control)["reload"]
    return _reload_state(control)


def test_the_primary_never_imports_the_app_and_workers_fork_from_the_template(served):
    cmd, port, control, _, log = served
    status = ctl_json(control)
    [template] = status["templates"]
    assert template["state"] == "current" and template["version"] == 1
    importers = [int(line) for line in log.read_text().split()]
    assert importers == [template["pid"]]  # once, by the template: not the primary, not the workers
    assert cmd.proc.pid not in importers
    for worker in cmd.track_workers(control):
        assert _ppid(worker) == template["pid"]
    assert _versions(port) == {"v1"}
    # it forks with one thread only, so no worker inherits a lock another thread held
    assert os.listdir(f"/proc/{template['pid']}/task") == [str(template["pid"])]


def test_a_reload_serves_the_new_code_from_a_new_template(served):
    cmd, port, control, app_dir, log = served
    old_template = ctl_json(control)["templates"][0]["pid"]
    old_workers = set(cmd.track_workers(control))
    _write(app_dir, "v2")
    assert _reload(control) == "done"
    assert _versions(port) == {"v2"}
    status = ctl_json(control)
    current = [t for t in status["templates"] if t["state"] == "current"]
    assert [t["version"] for t in current] == [2]
    workers = set(cmd.track_workers(control))
    assert not workers & old_workers
    assert all(_ppid(w) == current[0]["pid"] for w in workers)
    # the old template retires and exits once its last worker has gone: no zombie, no leftover
    assert _until(lambda: not pid_alive(old_template)), "the old template outlived its workers"
    assert _until(lambda: [t["version"] for t in ctl_json(control)["templates"]] == [2])
    assert cmd.proc.pid not in [int(line) for line in log.read_text().split()]


def test_a_reload_whose_import_fails_keeps_the_old_code_serving(served):
    cmd, port, control, app_dir, _ = served
    workers = set(cmd.track_workers(control))
    template = ctl_json(control)["templates"][0]["pid"]
    _write(app_dir, "v2", broken=True)
    assert _reload(control) == "failed"
    status = ctl_json(control)
    assert "SyntaxError" in status["reload"]["error"]
    assert set(cmd.track_workers(control)) == workers  # nothing was replaced
    assert [(t["pid"], t["state"]) for t in status["templates"]] == [(template, "current")]
    assert _versions(port) == {"v1"}
    cmd.expect(r"reload failed, the old workers keep serving: .*SyntaxError")
    # printed once: the traceback with the file and line, and the one line
    assert cmd.output.count("def broken(:") == 1, cmd.output
    # the next good save reloads
    _write(app_dir, "v3")
    assert _reload(control) == "done"
    assert _versions(port) == {"v3"}


def test_a_respawn_forks_from_the_template(served):
    cmd, port, control, _, log = served
    template = ctl_json(control)["templates"][0]["pid"]
    victim = cmd.track_workers(control)[0]
    os.kill(victim, signal.SIGKILL)
    assert _until(lambda: victim not in cmd.track_workers(control)
                  and sum(w["state"] == "ready" for w in ctl_json(control)["workers"]) == 2)
    fresh = [w for w in cmd.track_workers(control) if w != victim]
    assert all(_ppid(w) == template for w in fresh)
    assert [int(line) for line in log.read_text().split()] == [template]  # forked, not imported again
    assert _versions(port) == {"v1"}


def test_a_dead_template_is_replaced_and_serving_goes_on(served):
    cmd, port, control, _, _ = served
    template = ctl_json(control)["templates"][0]["pid"]
    os.kill(template, signal.SIGKILL)  # its workers end with it (their parent): the pool refills
    cmd.expect(rf"template v1 \(pid {template}\) died")
    assert _until(lambda: any(t["state"] == "current" and t["version"] == 2
                              for t in ctl_json(control)["templates"]), timeout=30)
    assert _until(lambda: sum(w["state"] == "ready" for w in ctl_json(control)["workers"]) == 2)
    cmd.track_workers(control)
    assert _versions(port) == {"v1"}


def test_a_broken_app_at_start_is_one_line(tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    _write(app_dir, "v1", broken=True)
    result = run_prefork(["serve", "verapp:app", "--preload", "--app-dir", str(app_dir), "--workers", "2",
                          "--bind", f"127.0.0.1:{free_port()}", "--control", str(tmp_path / "c.sock")],
                         env={"IMPORTS_LOG": str(tmp_path / "log")})
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "SyntaxError" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_an_app_that_starts_threads_at_import_is_not_forked(prefork_cmd, tmp_path):  # noqa: F811
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    _write(app_dir, "v1")
    with open(app_dir / "verapp.py", "a") as f:
        f.write("\nimport threading, time\nthreading.Thread(target=time.sleep, args=(3600,), daemon=True,"
                " name='pool-refresher').start()\n")
    log = tmp_path / "imports.log"
    port, control = free_port(), str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", "verapp:app", "--preload", "--app-dir", str(app_dir), "--workers", "2",
                      "--bind", f"127.0.0.1:{port}", "--control", control, env={"IMPORTS_LOG": str(log)})
    cmd.wait_ready()
    cmd.expect(r"the app starts threads at import \(pool-refresher\): forking from it is unsafe")
    workers = cmd.track_workers(control)
    assert all(_ppid(w) == cmd.proc.pid for w in workers)  # fresh interpreters, the primary's children
    importers = [int(line) for line in log.read_text().split()]
    assert sorted(importers[1:]) == sorted(workers) and cmd.proc.pid not in importers
    assert ctl_json(control)["templates"] == []
    assert _reload(control) == "done"
    assert _versions(port) == {"v1"}


def test_a_connection_opened_at_import_is_reported(prefork_cmd, tmp_path):  # noqa: F811
    import socket

    listener = socket.create_server(("127.0.0.1", 0))  # a "database" the app connects to at import
    db_port = listener.getsockname()[1]
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    _write(app_dir, "v1")
    with open(app_dir / "verapp.py", "a") as f:
        f.write(f"\nimport socket\nDB = socket.create_connection(('127.0.0.1', {db_port}))\n")
    port, control = free_port(), str(tmp_path / "ctl.sock")
    try:
        cmd = prefork_cmd("serve", "verapp:app", "--app-dir", str(app_dir), "--workers", "1",
                          "--bind", f"127.0.0.1:{port}", "--control", control,
                          env={"IMPORTS_LOG": str(tmp_path / "log")})
        cmd.wait_ready()
        cmd.expect(rf"the app opened 1 connection\(s\) at import \(127.0.0.1:{db_port}\), which every "
                   "forked worker shares")
    finally:
        listener.close()


def _listening_pids(port: int) -> set[int]:
    """Pids holding a listening TCP socket on `port` (from /proc: inodes of /proc/net/tcp)."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    pids = set()
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{name}/fd/{fd}") for fd in os.listdir(f"/proc/{name}/fd")]
        except OSError:
            continue
        if any(link[8:-1] in inodes for link in links if link.startswith("socket:[")):
            pids.add(int(name))
    return pids


def test_forked_workers_follow_the_policy_of_the_primary(served):
    """reuseport (serve's default): each forked worker listens on a socket of its own, as a fresh
    interpreter would; the template imported prefork before it knew the policy."""
    cmd, port, control, _, _ = served
    workers = set(cmd.track_workers(control))
    assert workers <= _listening_pids(port), (workers, _listening_pids(port))


def test_a_template_that_stops_answering_cannot_hang_the_primary(served):
    """SIGSTOPped (a debugger, a freezer): the exit report of its worker never comes. The primary
    waits a bounded time, then ends that template and refills the pool; it answers throughout."""
    cmd, port, control, _, _ = served
    template = ctl_json(control)["templates"][0]["pid"]
    victim = cmd.track_workers(control)[0]
    os.kill(template, signal.SIGSTOP)
    try:
        os.kill(victim, signal.SIGKILL)
        assert _until(lambda: not pid_alive(template), timeout=30), "the stopped template is still there"
        assert _until(lambda: sum(w["state"] == "ready" for w in ctl_json(control)["workers"]) == 2,
                      timeout=30)
        cmd.track_workers(control)
        assert _versions(port) == {"v1"}
    finally:
        if pid_alive(template):
            os.kill(template, signal.SIGCONT)


def test_workers_forked_after_a_log_rotation_write_to_the_new_file(prefork_cmd, tmp_path):  # noqa: F811
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    _write(app_dir, "v1")
    log, port, control = tmp_path / "app.log", free_port(), str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", "verapp:app", "--app-dir", str(app_dir), "--workers", "1",
                      "--log-file", str(log), "--bind", f"127.0.0.1:{port}", "--control", control,
                      env={"IMPORTS_LOG": str(tmp_path / "imports")})
    assert _until(lambda: "ready:" in log.read_text() if log.exists() else False)
    os.rename(log, tmp_path / "app.log.1")
    os.kill(cmd.proc.pid, signal.SIGUSR1)
    assert _until(log.exists)
    victim = cmd.track_workers(control)[0]
    os.kill(victim, signal.SIGKILL)
    assert _until(lambda: "[worker 2] INFO: Application startup complete" in log.read_text()), log.read_text()
    assert "[worker 2]" not in (tmp_path / "app.log.1").read_text()
    cmd.track_workers(control)


def test_a_stop_during_a_reloads_import_ends_cleanly(served):
    cmd, port, control, app_dir, _ = served
    gate = app_dir / "gate"
    with open(app_dir / "verapp.py", "a") as f:  # the reload's import waits for a file that never comes
        f.write(f"\nimport os, time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)\n")
    assert run_prefork(["ctl", "--control", control, "reload"]).returncode == 0
    assert _until(lambda: len(ctl_json(control)["templates"]) == 2)
    importing = [t["pid"] for t in ctl_json(control)["templates"] if t["state"] == "importing"]
    cmd.proc.send_signal(signal.SIGTERM)
    assert cmd.finish(30) == 0, cmd.output
    assert importing and not any(pid_alive(p) for p in importing)


def test_a_reload_takes_the_spare_template(served):
    """The spare has imported the serving machinery, not the app: a reload makes it import the app
    (it becomes v2); a new spare follows. The app's folder is followed as given when it takes over."""
    cmd, port, control, app_dir, log = served
    assert _until(lambda: _spare_pid(cmd.proc.pid))  # a second after the first template's import
    first_spare = _spare_pid(cmd.proc.pid)
    assert first_spare not in [int(line) for line in log.read_text().split()]  # it has not the app
    _write(app_dir, "v2")
    assert _reload(control) == "done"
    current = [t for t in ctl_json(control)["templates"] if t["state"] == "current"]
    assert current[0]["pid"] == first_spare and current[0]["version"] == 2
    assert _versions(port) == {"v2"}
    assert _until(lambda: _spare_pid(cmd.proc.pid) not in (None, first_spare))


def _spare_pid(primary: int) -> int | None:
    """The primary's spare template, once it has a title (it imported the machinery)."""
    return _child_of(primary, "cmdline", lambda data: data.startswith(b"prefork: template (spare)"))


def _child_of(primary: int, proc_file: str, match: Callable[[bytes], bool]) -> int | None:
    """A child of `primary` whose /proc/PID/<proc_file> matches."""
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/{proc_file}", "rb") as f:
                data = f.read()
        except OSError:
            continue
        if ppid == primary and match(data):
            return int(name)
    return None


SLOW_SPARE = """\
import os, time
if os.environ.get("PREFORK_TEMPLATE_SPARE") == "1":  # a spare template, as it starts
    time.sleep(float(os.environ.get("SLOW_SPARE_S", "0")))
"""


def _starting_spare(primary: int) -> int | None:
    """A spare template still at its start (no title yet): the primary's child that has
    PREFORK_TEMPLATE_SPARE=1 in its environment."""
    return _child_of(primary, "environ", lambda data: b"PREFORK_TEMPLATE_SPARE=1" in data.split(b"\0"))


def test_a_reload_takes_a_spare_that_is_still_starting(prefork_cmd, tmp_path):  # noqa: F811
    """A reload that comes while the spare still imports the machinery waits for that spare (its
    "go" is queued) instead of killing it and starting a fresh interpreter."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_SPARE)
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    _write(app_dir, "v1")
    port, control = free_port(), str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", "verapp:app", "--app-dir", str(app_dir), "--workers", "1",
                      "--bind", f"127.0.0.1:{port}", "--control", control,
                      env={"IMPORTS_LOG": str(tmp_path / "imports.log"), "PYTHONDONTWRITEBYTECODE": "1",
                           "PYTHONPATH": str(site), "SLOW_SPARE_S": "2"})
    cmd.wait_ready()
    cmd.track_workers(control)
    assert _until(lambda: _starting_spare(cmd.proc.pid))  # a second after the first import
    spare = _starting_spare(cmd.proc.pid)
    assert _spare_pid(cmd.proc.pid) is None  # still asleep at its start: no title, nothing imported
    _write(app_dir, "v2")
    assert _reload(control) == "done", cmd.output
    current = [t for t in ctl_json(control)["templates"] if t["state"] == "current"]
    assert current[0]["pid"] == spare and current[0]["version"] == 2, (spare, ctl_json(control)["templates"])
    assert _versions(port) == {"v2"}
    cmd.proc.send_signal(signal.SIGTERM)
    assert cmd.finish() == 0, cmd.output
