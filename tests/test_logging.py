"""Logs, driven as a user would: timestamps on the primary's lines, `--log-format json` (every line
one JSON object), `--access-log-format` with gunicorn's atoms, `--log-file` and its reopening on
SIGUSR1 (logrotate). Real `prefork` commands, real HTTP requests, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from pathlib import Path

import pytest
from cli_helpers import ctl_json, free_port, pid_alive, prefork_cmd, run_prefork  # noqa: F401
from conftest import wait_until

APP = '''
import sys

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                print("app started", flush=True)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    print("handling", scope["path"])
    print("warned on stderr", file=sys.stderr)
    await send({"type": "http.response.start", "status": 201,
                "headers": [(b"content-type", b"text/plain"), (b"x-out", b"out-value")]})
    await send({"type": "http.response.body", "body": b"hello\\n"})
'''

SCRIPT = '''
import os, sys, time
import prefork

print("script started", flush=True)
print(f"format variable {os.environ.get('PREFORK_LOG_FORMAT')}", flush=True)  # the primary's, not ours
print("script on stderr", file=sys.stderr, flush=True)
n = 0
while True:  # a tick every 0.1 s: lines keep coming from every worker
    n += 1
    print(f"tick {n}", flush=True)
    time.sleep(0.1)
'''

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


def _app_dir(tmp_path: Path) -> Path:
    (tmp_path / "logapp.py").write_text(APP)
    return tmp_path


def _get(port: int, path: str = "/", headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        reply.read()
        return int(reply.status)


def _serve(prefork_cmd, tmp_path: Path, *extra: str, workers: int = 2):  # noqa: F811
    port = free_port()
    control = str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", "logapp:app", "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
                      "--control", control, *extra, cwd=_app_dir(tmp_path))
    return cmd, port, control


def _objects(text: str) -> list[dict]:
    """Every line of the output as a JSON object; a line that is not one fails the test."""
    out = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n{text}")
        assert isinstance(obj, dict), line
        assert {"ts", "level", "msg"} <= obj.keys(), line
        assert re.fullmatch(STAMP, obj["ts"]), line
        out.append(obj)
    return out


@pytest.mark.timeout(120)
def test_json_serve_every_line_is_an_object(prefork_cmd, tmp_path):  # noqa: F811
    cmd, port, control = _serve(prefork_cmd, tmp_path, "--log-format", "json", "--access-log")
    cmd.expect(r'"msg": "ready: 2 worker', 30)
    pids = cmd.track_workers(control)
    assert _get(port, "/first?x=1") == 201
    cmd.expect(r'"msg": "127\.0\.0\.1 - - \[.*GET /first\?x=1 HTTP/1\.1\\" 201 6"')
    assert run_prefork(["ctl", "--control", control, "reload"]).returncode == 0
    cmd.expect(r'"msg": "reload done"', 30)
    assert wait_until(lambda: not set(cmd.track_workers(control)) & set(pids), 30)  # the old ones drained
    assert _get(port, "/second") == 201
    cmd.expect(r'GET /second HTTP')
    cmd.proc.send_signal(signal.SIGTERM)
    assert cmd.finish() == 0, cmd.output
    objects = _objects(cmd.output)
    msgs = [o["msg"] for o in objects]
    assert "stopped" in msgs and any(m.startswith("ready: 2 worker") for m in msgs)
    banner = objects[0]
    assert banner["msg"].startswith("prefork ") and banner["banner"]["app"].startswith("logapp:app")
    printed_lines = (("app started", "info"), ("handling /first", "info"), ("warned on stderr", "error"))
    for printed, level in printed_lines:
        found = [o for o in objects if o["msg"] == printed]
        assert found, printed
        assert all(o["level"] == level and isinstance(o.get("worker"), int) for o in found), found
    uvicorn = [o for o in objects if o.get("logger") == "uvicorn.error"]
    assert uvicorn and all(isinstance(o.get("worker"), int) for o in uvicorn)
    access = [o for o in objects if o.get("method") == "GET"]
    assert {o["path"] for o in access} == {"/first", "/second"}
    for o in access:
        assert o["status"] == 201 and o["bytes"] == 6 and o["client"] == "127.0.0.1"
        assert isinstance(o["duration_ms"], float) and isinstance(o["worker"], int)
    # the primary's own lines carry no worker; every line from a worker does
    assert all("worker" not in o for o in objects if o["msg"].startswith(("ready:", "reload", "stopped")))


def test_json_run_wraps_script_output(prefork_cmd, tmp_path):  # noqa: F811
    script = tmp_path / "ticker.py"
    script.write_text(SCRIPT)
    cmd = prefork_cmd("run", "--workers", "2", "--ready", "online", "--log-format", "json",
                      "--control", str(tmp_path / "ctl.sock"), str(script))
    cmd.expect(r'"msg": "ready: 2 worker', 30)
    cmd.track_workers(str(tmp_path / "ctl.sock"))
    cmd.expect(r'"msg": "tick 3", "worker": 2')
    cmd.proc.send_signal(signal.SIGTERM)
    cmd.finish()
    objects = _objects(cmd.output)
    for wid in (1, 2):
        started = [o for o in objects if o["msg"] == "script started" and o.get("worker") == wid]
        assert started and started[0]["level"] == "info"
        assert [o for o in objects if o["msg"] == "format variable None" and o.get("worker") == wid]
        errs = [o for o in objects if o["msg"] == "script on stderr" and o.get("worker") == wid]
        assert errs and errs[0]["level"] == "error"


def test_text_lines_start_with_a_timestamp(prefork_cmd, tmp_path):  # noqa: F811
    cmd, port, control = _serve(prefork_cmd, tmp_path)
    cmd.wait_ready(30)
    cmd.track_workers(control)
    cmd.proc.send_signal(signal.SIGTERM)
    assert cmd.finish() == 0, cmd.output
    own = [line for line in cmd.output.splitlines() if "[prefork]" in line]
    assert len(own) >= 4, cmd.output  # ready x2, ready:, stopped x2, stopped
    for line in own:
        assert re.match(rf"^{STAMP} \[prefork\] ", line), line
    assert re.search(rf"^{STAMP} prefork \S+ serve$", cmd.output, re.M)  # the banner's title
    assert re.search(r"^\[worker 1\] app started$", cmd.output, re.M)  # workers' lines as they were


def test_access_log_format_atoms(prefork_cmd, tmp_path):  # noqa: F811
    fmt = ('%(m)s %(U)s q=%(q)s %(s)s %(H)s D=%(D)s M=%(M)s %({x-test}i)s %({x-out}o)s '
           '%(a)s %(f)s "%(r)s" 100%%')
    cmd, port, control = _serve(prefork_cmd, tmp_path, "--access-log-format", fmt, workers=1)
    cmd.wait_ready(30)
    cmd.track_workers(control)
    _get(port, "/atoms?a=1", {"X-Test": "header-value", "User-Agent": "tester/1"})
    m = cmd.expect(r"^GET /atoms q=a=1 201 HTTP/1\.1 D=(\d+) M=(\d+) header-value out-value tester/1 - "
                   r'"GET /atoms\?a=1 HTTP/1\.1" 100%$')
    assert int(m[1]) >= 1 and abs(int(m[2]) - int(m[1]) // 1000) <= 1


@pytest.mark.parametrize("fmt", ["%(zz)s", "%(h)s %d", "100%", "%(h)s %({x}q)s"])
def test_bad_access_log_format_exits_2(tmp_path, fmt):
    result = run_prefork(["serve", "logapp:app", "--bind", f"127.0.0.1:{free_port()}",
                          "--control", str(tmp_path / "ctl.sock"), "--access-log-format", fmt],
                         cwd=_app_dir(tmp_path))
    assert result.returncode == 2, result
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and "--access-log-format" in lines[0], lines


def test_log_file_that_cannot_be_opened(tmp_path):
    for path, why in ((tmp_path / "missing" / "x.log", "no such folder"), (tmp_path, "is a folder")):
        result = run_prefork(["serve", "logapp:app", "--bind", f"127.0.0.1:{free_port()}",
                              "--control", str(tmp_path / "ctl.sock"), "--log-file", str(path)],
                             cwd=_app_dir(tmp_path))
        assert result.returncode == 1, result
        lines = (result.stdout + result.stderr).strip().splitlines()
        assert len(lines) == 1 and why in lines[0] and "--log-file" in lines[0], lines


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _workers_in(path: Path) -> set[int]:
    """The worker ids of the JSON access lines in the file."""
    ids = set()
    for line in _read(path).splitlines():
        try:
            obj = json.loads(line)
        except ValueError:  # the last line, half written as we read
            continue
        if obj.get("method") == "GET" and "worker" in obj:
            ids.add(obj["worker"])
    return ids


@pytest.mark.timeout(120)
def test_log_file_gets_everything_and_reopens_on_usr1(prefork_cmd, tmp_path):  # noqa: F811
    log = tmp_path / "prefork.log"
    cmd, port, control = _serve(prefork_cmd, tmp_path, "--log-file", str(log), "--access-log",
                                "--log-format", "json")
    assert wait_until(lambda: '"msg": "ready: 2 worker' in _read(log), 30), _read(log) + cmd.output
    cmd.track_workers(control)
    assert oct(log.stat().st_mode & 0o777) == oct(0o640 & ~_umask())
    assert wait_until(lambda: _get(port) and _workers_in(log) == {1, 2}, 30), _read(log)
    text = _read(log)
    _objects(text)
    assert "app started" in text and '"banner"' in text
    os.rename(log, tmp_path / "prefork.log.1")
    cmd.proc.send_signal(signal.SIGUSR1)
    assert wait_until(lambda: "reopened the log file" in _read(log), 15), cmd.output
    # the workers are told through their channel: soon both write to the new file as well
    assert wait_until(lambda: _get(port) and _workers_in(log) == {1, 2}, 30), _read(log)
    cmd.proc.send_signal(signal.SIGTERM)
    assert cmd.finish() == 0, cmd.output
    assert cmd.output == ""  # nothing went to the terminal
    assert '"msg": "stopped"' in _read(log) and "stopped" not in _read(tmp_path / "prefork.log.1")
    _objects(_read(log))


@pytest.mark.timeout(90)
def test_run_workers_follow_the_reopen(prefork_cmd, tmp_path):  # noqa: F811
    script = tmp_path / "ticker.py"
    script.write_text(SCRIPT)
    log = tmp_path / "run.log"
    cmd = prefork_cmd("run", "--workers", "2", "--ready", "online", "--log-file", str(log),
                      "--control", str(tmp_path / "ctl.sock"), str(script))
    assert wait_until(lambda: "[prefork] ready: 2 worker" in _read(log), 30), _read(log)
    cmd.track_workers(str(tmp_path / "ctl.sock"))
    os.rename(log, tmp_path / "run.log.1")
    cmd.proc.send_signal(signal.SIGUSR1)

    def both_tick() -> bool:
        text = _read(log)
        return "[worker 1] tick" in text and "[worker 2] tick" in text

    assert wait_until(both_tick, 20), _read(log)
    assert re.search(rf"^{STAMP} \[prefork\] SIGUSR1: reopened the log file", _read(log), re.M)
    cmd.proc.send_signal(signal.SIGTERM)
    cmd.finish()


def test_usr1_without_log_file_harms_nothing(prefork_cmd, tmp_path):  # noqa: F811
    cmd, port, control = _serve(prefork_cmd, tmp_path)
    cmd.wait_ready(30)
    pids = cmd.track_workers(control)
    cmd.proc.send_signal(signal.SIGUSR1)
    os.kill(pids[0], signal.SIGUSR1)  # a serve worker takes it too, rather than die of it
    # once neither has SIGUSR1 pending, the kernel has delivered it: a default action would have ended it
    assert wait_until(lambda: not any(_pending(pid, signal.SIGUSR1) for pid in (cmd.proc.pid, pids[0])), 20)
    assert _get(port) == 201
    assert cmd.proc.poll() is None and all(pid_alive(p) for p in pids)
    assert sorted(w["pid"] for w in ctl_json(control)["workers"]) == sorted(pids)


def _pending(pid: int, signum: int) -> bool:
    """Whether `signum` waits to be delivered to `pid` (its thread or process pending set)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            masks = [int(line.split()[1], 16) for line in f if line.startswith(("SigPnd:", "ShdPnd:"))]
    except OSError:
        return False
    return any(mask & (1 << (signum - 1)) for mask in masks)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
