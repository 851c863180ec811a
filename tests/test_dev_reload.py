"""`prefork serve --reload` (development, #12): a saved file reloads every worker, a save that breaks
the app keeps the old workers serving with the error printed once, a burst of changes is one reload.
Real servers on 127.0.0.1 with an app file in the test's folder, edited as a person would."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from cli_helpers import free_port, prefork_cmd, run_prefork  # noqa: F401

from prefork.cli.devreload import FileFilter

pytestmark = pytest.mark.timeout(60)

APP = '''import os

VERSION = "{version}"


async def app(scope, receive, send):
    body = f"{{VERSION}} {{os.getpid()}}".encode()
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]}})
    await send({{"type": "http.response.body", "body": body}})
'''
BROKEN = 'import os\n\nVERSION = ("v9"\n'  # line 3: '(' was never closed


def ask(port: int) -> tuple[str, int]:
    """One request on a new connection: (version, pid of the worker that answered)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    version, pid = data.partition(b"\r\n\r\n")[2].decode().split()
    return version, int(pid)


def settle(cmd, control: str, port: int, version: str, workers: int = 2, timeout: float = 30.0) -> set[int]:
    """Poll until every answer says `version` and every current worker (by pid) gave one."""
    deadline = time.monotonic() + timeout
    answers: list[tuple[str, int]] = []
    while time.monotonic() < deadline:
        pids = set(cmd.track_workers(control))
        try:
            answers = [ask(port) for _ in range(16)]
        except (OSError, ValueError):  # a connection to a worker draining after the reload
            answers = []
        if len(pids) == workers and answers and all(v == version for v, _ in answers) \
                and {pid for _, pid in answers} == pids:
            return pids
        time.sleep(0.1)
    pytest.fail(f"not every worker serves {version} after {timeout}s: {answers}\n{cmd.output}")


def count(cmd, pattern: str) -> int:
    return len(re.findall(pattern, cmd.output))


def wait_count(cmd, pattern: str, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while count(cmd, pattern) < n:
        if time.monotonic() > deadline or cmd.proc.poll() is not None:
            pytest.fail(f"{pattern!r} not seen {n} time(s) in {timeout}s\n{cmd.output}")
        time.sleep(0.05)


def assert_printed_once(output: str) -> None:
    """The broken save's error: one line of the primary's with the file and line, and at most one
    traceback showing the line (the template's, with --preload; a worker prints none for it)."""
    errors = [line for line in output.splitlines() if "[prefork]" in line and "SyntaxError" in line]
    assert len(errors) == 1, output
    assert "(app.py, line 3)" in errors[0], errors[0]
    assert output.count('VERSION = ("v9"') <= 1, output


def write(path: Path, text: str) -> None:
    path.write_text(text)


@pytest.mark.parametrize("mode", ["spawn", "preload"])
def test_edit_break_fix(prefork_cmd, tmp_path, mode):  # noqa: F811
    """v1 -> v2 on both workers; a SyntaxError keeps v2 serving, printed once (also while a worker
    that died meanwhile fails to boot again and again); the fix v3 serves on both workers."""
    app = tmp_path / "app.py"
    write(app, APP.format(version="v1"))
    port, control = free_port(), str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", "app:app", "--app-dir", str(tmp_path), "--reload", "--workers", "2",
                      "--bind", f"127.0.0.1:{port}", "--control", control, "--lifespan", "off",
                      cwd=tmp_path, env={"PREFORK_PRELOAD": "1" if mode == "preload" else "0",
                                         "PYTHONDONTWRITEBYTECODE": ""})  # empty: unset, as usually
    cmd.wait_ready(30)
    settle(cmd, control, port, "v1")

    write(app, APP.format(version="v2"))
    cmd.expect(r"1 file\(s\) changed \(app\.py\): reloading")
    v2_pids = settle(cmd, control, port, "v2")

    write(app, BROKEN)
    wait_count(cmd, r"reload failed", 1)
    assert [ask(port)[0] for _ in range(8)] == ["v2"] * 8  # the old workers serve on
    assert set(cmd.track_workers(control)) == v2_pids
    if mode == "spawn":  # a worker that dies now is started again with the broken file, in a loop
        os.kill(sorted(v2_pids)[0], signal.SIGKILL)
        wait_count(cmd, r"died \(code 3\)", 3)
    assert_printed_once(cmd.output)

    # v3 has v2's size and mtime: Python would take v2's .pyc for it (the workers write none)
    stat = app.stat()
    write(app, APP.format(version="v2").replace("v2", "v3"))
    os.utime(app, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    settle(cmd, control, port, "v3")
    assert_printed_once(cmd.output)

    before = len(cmd.output)
    cmd.proc.send_signal(signal.SIGTERM)  # the watcher thread stops with the server, quietly
    assert cmd.finish() == 0, cmd.output
    assert "watcher failed" not in cmd.output and "Traceback" not in cmd.output[before:], cmd.output


def test_a_broken_import_prints_its_traceback_once(prefork_cmd, tmp_path):  # noqa: F811
    """Without --preload each new worker imports the app: a NameError at import is shown with its
    traceback once, not again by each worker of a crash loop (a worker died meanwhile)."""
    app = tmp_path / "app.py"
    write(app, APP.format(version="v1"))
    port, control = free_port(), str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", "app:app", "--app-dir", str(tmp_path), "--reload", "--workers", "2",
                      "--bind", f"127.0.0.1:{port}", "--control", control, "--lifespan", "off",
                      cwd=tmp_path, env={"PREFORK_PRELOAD": "0"})
    cmd.wait_ready(30)
    pids = settle(cmd, control, port, "v1")
    write(app, APP.format(version="v1") + "undefined_name\n")
    wait_count(cmd, r"reload failed", 1)
    os.kill(sorted(pids)[0], signal.SIGKILL)
    wait_count(cmd, r"died \(code 3\)", 3)
    assert count(cmd, r"Traceback \(most recent call last\)") == 1, cmd.output
    assert count(cmd, r'File ".*app\.py", line 11, in <module>') == 1, cmd.output
    assert count(cmd, r"could not start: NameError: name 'undefined_name' is not defined") == 1, cmd.output
    assert [ask(port)[0] for _ in range(4)] == ["v1"] * 4


def test_burst_of_changes_is_one_reload(prefork_cmd, tmp_path):  # noqa: F811
    """20 files written at once (a checkout): one reload, and only the files that count are named."""
    (tmp_path / "app.py").write_text(APP.format(version="v1"))
    src = tmp_path / "src"
    for folder in ("src/__pycache__", "src/.git/hooks", "src/assets"):
        (tmp_path / folder).mkdir(parents=True)
    port, control = free_port(), str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", "app:app", "--app-dir", str(tmp_path), "--reload", "--reload-dir", "src",
                      "--reload-include", "*.cfg", "--reload-exclude", "skip_*.py", "--reload-exclude",
                      str(src / "assets"), "--bind", f"127.0.0.1:{port}", "--control", control,
                      "--workers", "1", "--lifespan", "off", cwd=tmp_path)
    cmd.wait_ready(30)
    for name in ("notes.txt", ".hidden.py", "__pycache__/x.py", ".git/hooks/h.py", "skip_me.py",
                 "assets/a.py", "m0.pyc", "m0.py~"):  # none of these counts
        (src / name).write_text("x = 1\n")
    for i in range(20):
        (src / f"m{i}.py").write_text(f"x = {i}\n")
    (src / "settings.cfg").write_text("[x]\n")
    cmd.expect(r"reload done", 30)
    changed = re.findall(r"(\d+) file\(s\) changed \((.*)\): reloading", cmd.output)
    assert changed == [("21", "m0.py, m1.py, m10.py, ...")], cmd.output
    assert count(cmd, r"reloading 1 worker\(s\)") == 1, cmd.output
    settle(cmd, control, port, "v1", workers=1)


@pytest.mark.parametrize("preload", ["0", "1"])
def test_bad_reload_dir_is_one_line_exit_2(tmp_path, preload):
    """Found before anything starts: with --preload, before the template imports the app."""
    result = run_prefork(["serve", "tests.apps.hello:asgi", "--reload", "--reload-dir",
                          str(tmp_path / "nope"), "--bind", f"127.0.0.1:{free_port()}"],
                         env={"PREFORK_PRELOAD": preload})
    assert result.stdout == "", result.stdout
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--reload-dir" in lines[0] and "no such folder" in lines[0], result.stderr


def test_reload_without_watchfiles_is_one_line_exit_2(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()  # `import watchfiles` finds this one first, as if the extra were not installed
    (shadow / "watchfiles.py").write_text("raise ImportError('No module named watchfiles')\n")
    result = run_prefork(["serve", "tests.apps.hello:asgi", "--reload", "--bind", f"127.0.0.1:{free_port()}"],
                         env={"PYTHONPATH": str(shadow)})
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'prefork[reload]'" in lines[0], result.stderr


def test_a_failing_watcher_is_logged_and_the_server_serves_on(prefork_cmd, tmp_path):  # noqa: F811
    shadow = tmp_path / "shadow"
    shadow.mkdir()  # a watchfiles whose watch() fails as the real one does at the OS's watch limit
    (shadow / "watchfiles.py").write_text(
        "def watch(*paths, **options):\n    raise OSError('OS file watch limit reached')\n    yield\n")
    (tmp_path / "app.py").write_text(APP.format(version="v1"))
    port, control = free_port(), str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", "app:app", "--app-dir", str(tmp_path), "--reload", "--workers", "1",
                      "--bind", f"127.0.0.1:{port}", "--control", control, "--lifespan", "off",
                      env={"PYTHONPATH": str(shadow)}, cwd=tmp_path)
    cmd.wait_ready(30)
    cmd.expect(r"file watcher failed \(OSError: OS file watch limit reached\); polling the files instead")
    cmd.expect(r"file watcher failed .*; no more reloads on changes")
    settle(cmd, control, port, "v1", workers=1)
    (tmp_path / "app.py").write_text(APP.format(version="v2"))
    assert run_prefork(["ctl", "--control", control, "reload"]).returncode == 0
    settle(cmd, control, port, "v2", workers=1)


@pytest.mark.parametrize(("path", "counts"), [
    ("/w/app.py", True), ("/w/pkg/models.py", True), ("/w/notes.txt", False), ("/w/.app.py.swp", False),
    ("/w/.hidden.py", False), ("/w/.venv/lib/x.py", False), ("/w/pkg/__pycache__/m.py", False),
    ("/w/node_modules/x.py", False), ("/w/app.pyc", False), ("/w/conf/site.toml", True),
    ("/w/migrations/0001.py", False), ("/w/.env", True),
])
def test_file_filter(path, counts):
    """uvicorn's rules: --reload-include globs (*.py) minus --reload-exclude globs (.*, ...), and
    never inside a cache, VCS or virtualenv folder; a named include (.env) counts even if hidden."""
    check = FileFilter(["/w"], ["*.toml", ".env"], ["migrations/*.py"])
    assert check(None, path) is counts
