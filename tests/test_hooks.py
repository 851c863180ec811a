"""--hooks MODULE: gunicorn's server hooks, each called with the right arguments in the right
process (tests/apps/hooks_record.py appends one JSON line per call to $HOOKS_LOG), a raising hook
logged and survived, a raising on_starting refusing the start (#12)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from cli_helpers import free_port, pid_alive, prefork_cmd, run_prefork  # noqa: F401

APP = "tests.apps.hello:asgi"
HOOKS = "tests.apps.hooks_record"
pytestmark = pytest.mark.timeout(90)


def _calls(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _wait_for(log: Path, check, what: str, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        calls = _calls(log)
        if check(calls):
            return calls
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not seen in {timeout} s; calls: {[c['hook'] for c in calls]}")
        time.sleep(0.05)


def _named(calls: list[dict], hook: str) -> list[dict]:
    return [c for c in calls if c["hook"] == hook]


def _serve(prefork_cmd, tmp_path: Path, *extra: str, env: dict | None = None):  # noqa: F811
    port, log, control = free_port(), tmp_path / "hooks.jsonl", str(tmp_path / "c.sock")
    cmd = prefork_cmd("serve", APP, "--workers", "2", "--bind", f"127.0.0.1:{port}", "--control", control,
                      "--hooks", HOOKS, *extra, env={"HOOKS_LOG": str(log), **(env or {})})
    return cmd, port, log, control


@pytest.mark.parametrize("preload", [False, True], ids=["spawned", "preload"])
def test_each_hook_with_its_arguments(prefork_cmd, tmp_path, preload):  # noqa: F811
    cmd, port, log, control = _serve(prefork_cmd, tmp_path, "--preload" if preload else "--no-preload")
    cmd.wait_ready(30)
    calls = _wait_for(log, lambda c: _named(c, "when_ready"), "when_ready")
    primary = cmd.proc.pid
    first = calls[0]
    assert first["hook"] == "on_starting" and first["pid"] == primary, calls
    assert first["server_type"] == "HookServer" and first["server_pid"] == primary
    assert first["app"] == APP and first["num_workers"] == 2 and first["workers_cfg"] == 2
    changed = _named(calls, "nworkers_changed")[0]
    assert (changed["new"], changed["old"], changed["pid"]) == (2, None, primary), calls
    forks = _named(calls, "post_fork")
    assert sorted(c["worker_id"] for c in forks) == [1, 2], calls
    for fork in forks:  # in the worker, before the app is imported (unless preloaded)
        assert fork["pid"] != primary and fork["is_worker"] is True
        assert fork["server_type"] == "WorkerServer" and fork["server_pid"] == primary and fork["app"] == APP
        assert fork["app_loaded"] is preload
        init = [c for c in _named(calls, "post_worker_init") if c["pid"] == fork["pid"]]
        assert len(init) == 1 and init[0]["worker_id"] == fork["worker_id"] and init[0]["app_loaded"]
        assert "PREFORK_HOOKS" not in init[0]["env_left"]  # read, then out of the app's environment
        assert calls.index(fork) < calls.index(init[0]) < calls.index(_named(calls, "when_ready")[0])
    ready = _named(calls, "when_ready")
    assert len(ready) == 1 and ready[0]["pid"] == primary and ready[0]["num_workers"] == 2
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text == "hello world\n"

    # scale: nworkers_changed(3, 2), in the primary
    assert run_prefork(["ctl", "--control", control, "scale", "3"]).returncode == 0
    calls = _wait_for(log, lambda c: any(x.get("new") == 3 for x in _named(c, "nworkers_changed")), "scale")
    assert [(c["new"], c["old"], c["pid"]) for c in _named(calls, "nworkers_changed")] == \
        [(2, None, primary), (3, 2, primary)]

    # a worker killed: child_exit(server, worker) in the primary, with that worker; no worker_exit
    victim = forks[0]
    os.kill(victim["pid"], signal.SIGKILL)
    calls = _wait_for(log, lambda c: _named(c, "child_exit"), "child_exit")
    exited = _named(calls, "child_exit")[0]
    assert (exited["worker_id"], exited["worker_pid"], exited["pid"]) == \
        (victim["worker_id"], victim["pid"], primary)
    assert not [c for c in _named(calls, "worker_exit") if c["pid"] == victim["pid"]]

    # a rolling reload: on_reload once, in the primary
    assert run_prefork(["ctl", "--control", control, "reload"]).returncode == 0
    calls = _wait_for(log, lambda c: _named(c, "on_reload"), "on_reload")
    assert [c["pid"] for c in _named(calls, "on_reload")] == [primary]

    # stopping: worker_exit in each worker that served, child_exit for each, on_exit last
    cmd.expect("reload done", 30)
    cmd.proc.send_signal(signal.SIGTERM)
    assert cmd.finish(30) == 0, cmd.output
    calls = _calls(log)
    assert calls[-1]["hook"] == "on_exit" and calls[-1]["pid"] == primary
    started = {c["pid"]: c["worker_id"] for c in _named(calls, "post_fork")}
    assert len(started) >= 5  # 2, one scaled up, one respawned, and the reload's replacements
    for pid, wid in started.items():
        if pid == victim["pid"]:
            continue
        mine = [c for c in _named(calls, "worker_exit") if c["pid"] == pid]
        said = [line for line in cmd.output.splitlines() if f"pid {pid}" in line]
        assert len(mine) == 1 and mine[0]["worker_id"] == wid and mine[0]["server_pid"] == primary, \
            (pid, wid, [c["hook"] for c in calls if c["pid"] == pid], said)
    assert sorted(c["worker_pid"] for c in _named(calls, "child_exit")) == sorted(started), calls


def test_a_raising_hook_is_logged_and_serving_goes_on(prefork_cmd, tmp_path):  # noqa: F811
    cmd, port, log, _ = _serve(prefork_cmd, tmp_path,
                               env={"HOOKS_RAISE": "when_ready,post_fork,post_worker_init"})
    cmd.wait_ready(30)
    cmd.expect(r"\[prefork\] hook when_ready failed: RuntimeError: when_ready was told to fail")
    cmd.expect(r"prefork: hook post_fork failed: RuntimeError: post_fork was told to fail")
    cmd.expect(r"prefork: hook post_worker_init failed: RuntimeError: post_worker_init was told")
    cmd.expect(r'hooks_record\.py", line \d+, in _record')  # its traceback
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text == "hello world\n"
    assert [c["hook"] for c in _calls(log)].count("post_worker_init") == 2  # the workers went on


@pytest.mark.parametrize("preload", [False, True], ids=["spawned", "preload"])
def test_on_starting_raising_stops_the_start(tmp_path, preload):
    log = tmp_path / "hooks.jsonl"
    result = run_prefork(["serve", APP, "--workers", "2", "--bind", f"127.0.0.1:{free_port()}",
                          "--control", str(tmp_path / "c.sock"), "--hooks", HOOKS,
                          "--preload" if preload else "--no-preload"],
                         env={"HOOKS_LOG": str(log), "HOOKS_RAISE": "on_starting"}, timeout=30)
    assert result.returncode == 1, result
    # with --preload the template has imported the app first (as gunicorn's --preload does before
    # on_starting), and says so; no worker started
    errors = [line for line in result.stderr.splitlines()
              if line.strip() and not (preload and "[prefork] template v1 (pid" in line)]
    assert errors == ["prefork: error: hook on_starting failed: RuntimeError: on_starting was told to "
                      "fail"], result.stderr
    assert [c["hook"] for c in _calls(log)] == ["on_starting"]  # no worker started


def test_hooks_from_the_config_file(tmp_path):
    """`hooks = "module"` in [tool.prefork] is the same as --hooks (on_starting raising shows it ran)."""
    config, log = tmp_path / "prefork.toml", tmp_path / "hooks.jsonl"
    config.write_text(f'[tool.prefork]\nhooks = "{HOOKS}"\n')
    result = run_prefork(["serve", APP, "--no-preload", "--config", str(config), "--bind",
                          f"127.0.0.1:{free_port()}", "--control", str(tmp_path / "c.sock")],
                         env={"HOOKS_LOG": str(log), "HOOKS_RAISE": "on_starting"}, timeout=30)
    assert result.returncode == 1 and "hook on_starting failed" in result.stderr, result
    assert [c["hook"] for c in _calls(log)] == ["on_starting"]


@pytest.mark.parametrize(("hooks", "words"), [
    ("tests.apps.hooks_bad", "when_ready is a str, not a function"),
    ("tests.apps.no_such_hooks", "cannot load it: ModuleNotFoundError"),
    ("missing/hooks.py", "cannot load it: FileNotFoundError"),
], ids=["not-callable", "no-module", "no-file"])
def test_unusable_hooks_module_is_one_line_exit_2(hooks, words):
    result = run_prefork(["serve", APP, "--hooks", hooks, "--bind", f"127.0.0.1:{free_port()}"])
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"prefork: error: --hooks {hooks}: ") and words in lines[0], lines


RUN_SCRIPT = """
import time
import prefork

prefork.worker.send("ready")
while True:
    time.sleep(0.05)
"""


def test_run_workers_call_their_hooks_from_a_file(prefork_cmd, tmp_path):  # noqa: F811
    script, log = tmp_path / "job.py", tmp_path / "hooks.jsonl"
    script.write_text(RUN_SCRIPT)
    hooks_file = str(Path(__file__).parent / "apps" / "hooks_record.py")
    cmd = prefork_cmd("run", "--workers", "2", "--ready", "message", "--control", str(tmp_path / "c.sock"),
                      "--hooks", hooks_file, str(script), env={"HOOKS_LOG": str(log)})
    cmd.wait_ready(30)
    calls = _wait_for(log, lambda c: len(_named(c, "post_worker_init")) == 2 and _named(c, "when_ready"),
                      "the workers' hooks")
    assert sorted(c["worker_id"] for c in _named(calls, "post_fork")) == [1, 2]
    assert _named(calls, "post_fork")[0]["app"] == str(script)
    cmd.proc.send_signal(signal.SIGTERM)
    assert cmd.finish(30) == 0, cmd.output
    calls = _calls(log)
    workers = {c["pid"] for c in _named(calls, "post_fork")}
    assert {c["pid"] for c in _named(calls, "worker_exit")} == workers  # once each, as they left
    assert len(_named(calls, "worker_exit")) == 2 and calls[-1]["hook"] == "on_exit"
    for pid in workers:
        assert not pid_alive(pid)
