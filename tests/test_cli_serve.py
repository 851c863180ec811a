"""`prefork serve` driven as a user would: the installed command, real apps, a real HTTP client."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from cli_helpers import ctl_json, free_port, pid_alive, prefork_cmd, run_prefork  # noqa: F401
from conftest import wait_until

APPS = {
    "starlette": ("tests.apps.star:app", "hello from starlette"),
    "flask": ("tests.apps.flaskapp:app", "hello from flask"),
    "django-wsgi": ("tests.apps.djproj.wsgi:application", "hello from django"),
    "django-asgi": ("tests.apps.djproj.asgi:application", "hello from django"),
}
CASES = [(name, "rr") for name in APPS] + [
    (name, policy) for policy in ("none", "reuseport", "least_conn") for name in ("starlette", "flask")
]


def _serve(prefork_cmd, tmp_path: Path, app: str, *extra: str, workers: int = 2, env=None):  # noqa: F811
    port = free_port()
    control = str(tmp_path / "ctl.sock")
    cmd = prefork_cmd(
        "serve",
        app,
        "--workers",
        str(workers),
        "--bind",
        f"127.0.0.1:{port}",
        "--control",
        control,
        *extra,
        env=env,
    )
    cmd.wait_ready()
    cmd.track_workers(control)
    return cmd, port, control


def _stop(cmd, control: str) -> None:
    pids = cmd.track_workers(control)
    cmd.proc.send_signal(15)
    assert cmd.finish() == 0, cmd.output
    for pid in pids:
        assert not pid_alive(pid), f"worker {pid} outlived the primary"


@pytest.mark.parametrize(("name", "policy"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_apps_answer_under_each_policy(prefork_cmd, tmp_path, name, policy):  # noqa: F811
    app, greeting = APPS[name]
    cmd, port, control = _serve(prefork_cmd, tmp_path, app, "--policy", policy)
    pids = set()
    for _ in range(30):  # a fresh connection each time, so every policy spreads them
        r = httpx.get(f"http://127.0.0.1:{port}/", headers={"Connection": "close"}, timeout=5)
        assert r.status_code == 200
        assert r.text.startswith(greeting)
        pids.add(int(r.text.split()[-1]))
    assert pids <= set(cmd.worker_pids)
    status = ctl_json(control)
    assert status["policy"] == policy
    assert len(status["workers"]) == 2
    _stop(cmd, control)


def test_websocket_echo_and_lifespan(prefork_cmd, tmp_path):  # noqa: F811
    from websockets.sync.client import connect

    log = tmp_path / "lifespan.log"
    cmd, port, control = _serve(
        prefork_cmd, tmp_path, "tests.apps.star:app", env={"APP_LIFESPAN_LOG": str(log)}
    )
    with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=5) as ws:
        for text in ("one", "two"):
            ws.send(text)
            assert ws.recv(timeout=5) == f"echo: {text}"
    pids = cmd.track_workers(control)
    assert sorted(
        int(x.split()[1]) for x in log.read_text().splitlines() if x.startswith("startup")
    ) == sorted(pids)
    _stop(cmd, control)
    shutdowns = [int(x.split()[1]) for x in log.read_text().splitlines() if x.startswith("shutdown")]
    assert sorted(shutdowns) == sorted(pids)


def test_ctl_status_scale_reload_stop(prefork_cmd, tmp_path):  # noqa: F811
    cmd, port, control = _serve(prefork_cmd, tmp_path, "tests.apps.star:app")
    url = f"http://127.0.0.1:{port}/"
    for _ in range(10):
        assert httpx.get(url, timeout=5).status_code == 200

    def counted() -> bool:  # counters travel with the heartbeat (every second)
        workers = ctl_json(control)["workers"]
        return (sum(w["requests"] for w in workers) >= 10 and sum(w["connections"] for w in workers) >= 10
                and all((w["rss"] or 0) > 0 for w in workers))

    assert wait_until(counted, 10), ctl_json(control)
    table = run_prefork(["ctl", "--control", control, "status"])
    assert table.returncode == 0, table.stderr
    for column in ("id", "pid", "state", "uptime", "restarts", "conns", "reqs", "in flight", "rss", "uss",
                   "cpu%"):
        assert column in table.stdout
    status = ctl_json(control)
    assert sum(w["requests"] for w in status["workers"]) >= 10
    assert sum(w["connections"] for w in status["workers"]) >= 10
    assert all(w["rss"] > 0 and w["state"] == "ready" for w in status["workers"])

    watch = run_prefork(
        ["ctl", "--control", control, "status", "--watch", "--count", "2", "--interval", "0.2"]
    )
    assert watch.returncode == 0 and watch.stdout.count("total:") == 2

    assert run_prefork(["ctl", "--control", control, "scale", "3"]).returncode == 0
    assert _until(lambda: _ready_count(control) == 3), cmd.output
    cmd.track_workers(control)

    # reload while a client keeps sending: no request may fail
    before = set(cmd.track_workers(control))
    failures: list[str] = []
    done = threading.Event()

    def hammer(headers: dict[str, str]) -> None:
        with httpx.Client(timeout=10) as client:  # keeps its connection alive unless told to close
            while not done.is_set():
                try:
                    r = client.get(url, headers=headers)
                    if r.status_code != 200:
                        failures.append(str(r.status_code))
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=hammer, args=(h,)) for h in ({"Connection": "close"}, {}, {})]
    for thread in threads:
        thread.start()
    try:
        assert run_prefork(["ctl", "--control", control, "reload"]).returncode == 0
        cmd.expect(r"reload done", timeout=30)
        assert _until(lambda: not (set(cmd.track_workers(control)) & before)), cmd.output
    finally:
        done.set()
        for thread in threads:
            thread.join(15)
    after = set(cmd.track_workers(control))
    assert len(after) == 3 and not (after & before), (before, after)
    assert failures == []

    stop = run_prefork(["ctl", "--control", control, "stop"])
    assert stop.returncode == 0
    assert cmd.finish() == 0, cmd.output
    for pid in before | after:
        assert not pid_alive(pid)
    assert not Path(control).exists()
    assert re.search(r"worker \d+ \(pid \d+\) stopped", cmd.output)


def _ready_count(control: str) -> int:
    return sum(1 for w in ctl_json(control)["workers"] if w["state"] == "ready")


def _until(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def test_access_log_proxy_headers_root_path(prefork_cmd, tmp_path):  # noqa: F811
    cmd, port, control = _serve(
        prefork_cmd,
        tmp_path,
        "tests.apps.star:app",
        "--access-log",
        "--proxy-headers",
        "--forwarded-allow-ips",
        "127.0.0.1",
        "--root-path",
        "/api",
        workers=1,
    )
    r = httpx.get(
        f"http://127.0.0.1:{port}/info?x=1",
        headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"},
        timeout=5,
    )
    body = r.json()
    assert body["client"] == "203.0.113.9" and body["scheme"] == "https" and body["root_path"] == "/api"
    m = cmd.expect(
        r"^203\.0\.113\.9 - - \[\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\] "
        r'"GET (/api)?/info\?x=1 HTTP/1\.1" 200 \d+$'
    )
    assert m
    assert re.search(r"^\[worker 1\] INFO: ", cmd.output, re.M)  # worker lines carry the worker's id
    _stop(cmd, control)


def test_banner_and_worker_lines(prefork_cmd, tmp_path):  # noqa: F811
    cmd, port, control = _serve(prefork_cmd, tmp_path, "tests.apps.flaskapp:app", "--policy", "least_conn")
    out = cmd.output
    assert re.search(r"prefork \d+\.\d+\.\d+ serve", out)
    assert f"http://127.0.0.1:{port}" in out and "least_conn" in out and control in out
    victim = cmd.track_workers(control)[0]
    import os
    import signal

    os.kill(victim, signal.SIGKILL)
    cmd.expect(rf"worker \d+ \(pid {victim}\) died \(signal SIGKILL\)")
    assert _until(lambda: _ready_count(control) == 2)
    cmd.track_workers(control)
    _stop(cmd, control)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(prefork_cmd, tmp_path):  # noqa: F811
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    cmd, port, control = _serve(
        prefork_cmd,
        tmp_path,
        "tests.apps.star:app",
        "--certfile",
        str(cert),
        "--keyfile",
        str(key),
        workers=1,
    )
    assert f"https://127.0.0.1:{port}" in cmd.output
    r = httpx.get(f"https://127.0.0.1:{port}/info", verify=False, timeout=5)
    assert r.status_code == 200 and r.json()["scheme"] == "https"
    _stop(cmd, control)


def test_config_file_env_and_flags(prefork_cmd, tmp_path):  # noqa: F811
    port = free_port()
    config = tmp_path / "prefork.toml"
    config.write_text(
        f'[tool.prefork]\napp = "tests.apps.star:app"\nworkers = 3\nbind = ["127.0.0.1:{port}"]\n'
        f'policy = "none"\ncontrol = "{tmp_path / "ctl.sock"}"\n'
    )
    control = str(tmp_path / "ctl.sock")
    # the file says 3 workers and policy none; the environment says 2 workers; the flag says reuseport
    cmd = prefork_cmd("serve", "--config", str(config), "--policy", "reuseport", env={"PREFORK_WORKERS": "2"})
    cmd.wait_ready()
    status = ctl_json(control)
    cmd.track_workers(control)
    assert len(status["workers"]) == 2 and status["policy"] == "reuseport"
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
    _stop(cmd, control)


def test_preload(prefork_cmd, tmp_path):  # noqa: F811
    # without setproctitle's titles (proctitle.py), which would tell the command lines apart
    cmd, port, control = _serve(prefork_cmd, tmp_path, "tests.apps.flaskapp:app", "--preload", workers=1,
                                env={"PREFORK_SETPROCTITLE": "0"})
    template = int(cmd.expect(r"template v1 \(pid (\d+)\) imported ")[1])
    assert "tests.apps.flaskapp:app (wsgi)" in cmd.output
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text.startswith("hello from flask")
    worker = cmd.track_workers(control)[0]
    # Forked from the template that imported the app, not a fresh interpreter: its child, with its
    # command line; the primary is neither
    with open(f"/proc/{worker}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[1]) == template
    with open(f"/proc/{template}/cmdline", "rb") as f, open(f"/proc/{worker}/cmdline", "rb") as g:
        assert f.read() == g.read() == f"{sys.executable}\0-m\0prefork.template_boot\0".encode()
    _stop(cmd, control)


def test_factory(prefork_cmd, tmp_path):  # noqa: F811
    cmd, port, control = _serve(prefork_cmd, tmp_path, "tests.apps.star:create_app", "--factory", workers=1)
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text.startswith("hello from starlette")
    _stop(cmd, control)


def test_max_requests_recycles_and_print_is_prefixed(prefork_cmd, tmp_path):  # noqa: F811
    cmd, port, control = _serve(
        prefork_cmd, tmp_path, "tests.apps.star:app", "--max-requests", "5", workers=1
    )
    first = cmd.track_workers(control)[0]
    with httpx.Client(timeout=5) as client:
        for _ in range(8):
            assert client.get(f"http://127.0.0.1:{port}/print").status_code == 200
    assert re.search(r"^\[worker 1\] printed by the app$", cmd.output, re.M)
    cmd.expect(rf"worker 1 \(pid {first}\) served \d+ requests \(max 5\): replacing it", timeout=10)
    assert _until(lambda: first not in cmd.track_workers(control) and _ready_count(control) == 1)
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
    _stop(cmd, control)


def test_timeout_replaces_a_worker_whose_loop_is_stuck(prefork_cmd, tmp_path):  # noqa: F811
    cmd, port, control = _serve(prefork_cmd, tmp_path, "tests.apps.star:app", "--timeout", "2", workers=1)
    stuck = cmd.track_workers(control)[0]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/block?s=30", timeout=15)
    cmd.expect(rf"worker 1 \(pid {stuck}\) did not answer for", timeout=5)
    assert _until(lambda: stuck not in cmd.track_workers(control) and _ready_count(control) == 1)
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
    _stop(cmd, control)
