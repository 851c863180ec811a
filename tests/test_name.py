"""--name NAME (gunicorn's): the process titles (`prefork: NAME primary APP`, kernel names NAME-primary
and NAME-wN), the primary's log tag ([NAME], and "name" in JSON lines), the banner's title, and the
default control socket NAME.sock, which `prefork ctl --name NAME` finds; two named servers do not
collide."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
from pathlib import Path

from cli_helpers import free_port, prefork_cmd, run_prefork  # noqa: F401

HAS_SETPROCTITLE = importlib.util.find_spec("setproctitle") is not None
APP = "tests.apps.hello:asgi"


def _args(pid: int) -> str:
    return subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True,
                          timeout=10).stdout.strip()


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _ctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_prefork(["ctl", *args], env=env)


def test_named_servers(prefork_cmd, tmp_path):  # noqa: F811
    runtime = tmp_path / "run"  # the per-user default folder is $XDG_RUNTIME_DIR/prefork
    runtime.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    api = prefork_cmd("serve", APP, "--name", "api", "--workers", "2", "--bind", f"127.0.0.1:{free_port()}",
                      env=env)
    web = prefork_cmd("serve", APP, "--workers", "1", "--bind", f"127.0.0.1:{free_port()}", "--log-format",
                      "json", env={**env, "PREFORK_NAME": "web-frontend-long"})
    api.expect(r"\[api\] ready: 2 worker\(s\)", 30)
    web.expect(r'"msg": "ready: 1 worker\(s\)', 30)
    folder = runtime / "prefork"
    assert sorted(p.name for p in folder.iterdir()) == ["api.sock", "web-frontend-long.sock"]

    status = _ctl(env, "--name", "api", "status", "--json")
    assert status.returncode == 0, status.stderr
    api_info = json.loads(status.stdout)
    api_pids = sorted(w["pid"] for w in api_info["workers"])
    api.worker_pids.update(api_pids)
    assert api_info["pid"] == api.proc.pid and api_info["control"] == str(folder / "api.sock")
    status = _ctl(env, "--name", "web-frontend-long", "status", "--json")
    assert status.returncode == 0, status.stderr
    web_info = json.loads(status.stdout)
    web.worker_pids.update(w["pid"] for w in web_info["workers"])
    assert web_info["pid"] == web.proc.pid

    assert _comm(api.proc.pid) == "api-primary"
    assert sorted(_comm(pid) for pid in api_pids) == ["api-w1", "api-w2"]
    assert _comm(web.proc.pid) == "web-fro-primary"  # the name is cut, never the role
    if HAS_SETPROCTITLE:
        assert _args(api.proc.pid) == f"prefork: api primary {APP}"
        assert sorted(_args(pid) for pid in api_pids) == [f"prefork: api worker 1 {APP}",
                                                          f"prefork: api worker 2 {APP}"]
    assert "serve [api]" in api.output and "(prefork ctl --name api status)" in api.output
    assert "[prefork]" not in api.output
    lines = [json.loads(line) for line in web.output.splitlines() if line.startswith("{")]
    assert any(rec.get("name") == "web-frontend-long" and rec["msg"].startswith("ready:") for rec in lines)

    unnamed = _ctl(env, "status")  # no server behind the default prefork.sock
    assert unnamed.returncode == 1 and "prefork.sock" in unnamed.stderr
    assert _ctl(env, "--name", "api", "stop").returncode == 0
    assert api.finish() == 0
    assert not (folder / "api.sock").exists()
    web.proc.send_signal(signal.SIGTERM)
    assert web.finish() == 0


def test_ctl_name_is_checked():
    bad = run_prefork(["ctl", "--name", "a b", "status"])
    assert bad.returncode == 2 and "--name" in bad.stderr and "expected 1 to 64 letters" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    both = run_prefork(["ctl", "--name", "api", "--control", "/tmp/x.sock", "status"])
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    assert len(both.stderr.strip().splitlines()) == 1
