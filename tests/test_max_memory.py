"""--max-memory compares a worker's own memory (USS), not its RSS (#13): a preloaded app's pages,
shared copy-on-write with the template, count in every worker's RSS but are no worker's to free."""

from __future__ import annotations

import re
import signal
import time
import urllib.request

import pytest
from cli_helpers import ctl_json, free_port, prefork_cmd  # noqa: F401
from conftest import wait_until

pytestmark = pytest.mark.timeout(90)


def test_shared_pages_do_not_recycle_a_worker_but_its_own_growth_does(prefork_cmd, tmp_path):  # noqa: F811
    port, admin, control = free_port(), free_port(), str(tmp_path / "ctl.sock")
    cmd = prefork_cmd("serve", "tests.apps.bigimport:app", "--workers", "1", "--bind", f"127.0.0.1:{port}",
                      "--control", control, "--max-memory", "60M", "--no-spare-template",
                      "--admin", f"127.0.0.1:{admin}")
    cmd.wait_ready(30)
    # its memory read (each beat compares it with --max-memory), then one more beat at least
    assert wait_until(lambda: ctl_json(control)["workers"][0]["uss"], 15), ctl_json(control)
    time.sleep(1.2)
    worker = ctl_json(control)["workers"][0]
    assert worker["rss"] > 80 << 20, worker  # the app's 80 MiB, resident through the template
    assert 0 < worker["uss"] < 60 << 20, worker
    assert worker["pss"] > worker["uss"], worker
    assert worker["restarts"] == 0 and "replacing" not in cmd.output, cmd.output
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    for family in ("rss", "uss", "pss"):
        assert re.search(rf'^prefork_worker_{family}_bytes{{worker="1"}} [1-9]', metrics, re.M), metrics

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/grow", timeout=10) as resp:
        assert resp.status == 200
    deadline = time.monotonic() + 20
    while not re.search(r"worker 1 \(pid \d+\) uses \d+ MiB of its own \(USS; max 60 MiB\): replacing it",
                        cmd.output):
        assert time.monotonic() < deadline, cmd.output
        time.sleep(0.1)
    deadline = time.monotonic() + 20
    while True:
        workers = ctl_json(control)["workers"]
        if [w["state"] for w in workers] == ["ready"] and workers[0]["pid"] != worker["pid"]:
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.1)
    cmd.proc.send_signal(signal.SIGTERM)
    assert cmd.finish() == 0, cmd.output
