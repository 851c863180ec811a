"""The primary's /metrics (src/prefork/metrics.py): prefork's own figures, exact after N requests, and
an app's prometheus_client metrics merged across its workers; the "M" message's checks."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import httpx
import pytest
from cli_helpers import free_port, prefork_cmd  # noqa: F401
from conftest import wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_admin import admin_get, serve

from prefork import protocol
from prefork.metrics import _escape_help, _escape_label, _number
from prefork.worker_metrics import BOUNDS


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, parsed by prometheus_client (which checks the format)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def hit(port: int, n: int, path: str = "/") -> Counter[str]:
    """n requests, each on its own connection (so both workers get some); who answered how often."""
    served: Counter[str] = Counter()
    for _ in range(n):
        reply = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10, headers={"Connection": "close"})
        assert reply.status_code == 200
        served[reply.text.strip()] += 1
    return served


def pids(admin: int) -> dict[str, str]:
    """worker id -> pid, from /status."""
    import json

    return {str(w["id"]): str(w["pid"]) for w in json.loads(admin_get(admin, "/status")[1])["workers"]}


@pytest.mark.timeout(90)
def test_requests_are_counted_per_worker_exactly(prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    cmd, port, admin = serve(prefork_cmd, tmp_path, "tests.apps.slow_start:app", "--policy", "rr")
    cmd.wait_ready()
    served = hit(port, 60)
    text = admin_get(admin, "/metrics")[1]
    got = samples(text)
    by_pid = {pid: got[("prefork_requests_total", (("worker", wid),))] for wid, pid in pids(admin).items()}
    assert by_pid == {pid: served.get(pid, 0) for pid in by_pid}, text
    assert sum(by_pid.values()) == 60
    assert got[("prefork_request_duration_seconds_count", ())] == 60
    assert got[("prefork_request_duration_seconds_bucket", (("le", "+Inf"),))] == 60
    assert 0 < got[("prefork_request_duration_seconds_sum", ())] < 60
    assert got[("prefork_handoffs_total", ())] >= 60  # rr: the primary handed each connection
    assert got[("prefork_workers", (("state", "ready"),))] == 2
    assert got[("prefork_reloads_total", (("result", "ok"),))] == 0
    for wid in pids(admin):
        assert got[("prefork_worker_rss_bytes", (("worker", wid),))] > 1 << 20
        assert got[("prefork_connections", (("worker", wid),))] == 0  # all closed by now
    assert "# TYPE prefork_request_duration_seconds histogram" in text
    reply = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10)
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"

    # open connections are counted as open: two keep-alive clients
    clients = [httpx.Client(timeout=10) for _ in range(2)]
    try:
        for client in clients:
            assert client.get(f"http://127.0.0.1:{port}/").status_code == 200
        got = samples(admin_get(admin, "/metrics")[1])
        assert sum(v for (name, _), v in got.items() if name == "prefork_connections") == 2
    finally:
        for client in clients:
            client.close()
    # a reload is counted
    cmd.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: samples(admin_get(admin, "/metrics")[1]).get(
        ("prefork_reloads_total", (("result", "ok"),))) == 1, 40), cmd.output


@pytest.mark.timeout(90)
def test_an_apps_prometheus_client_metrics_are_merged(prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    cmd, port, admin = serve(prefork_cmd, tmp_path, "tests.apps.prom_app:app")
    cmd.wait_ready()
    served = hit(port, 40)
    assert len(served) == 2, served  # both workers served some (reuseport spreads connections)
    text = admin_get(admin, "/metrics")[1]
    got = samples(text)
    assert got[("app_hits_total", (("path", "/"),))] == 40, text
    assert got[("app_body_bytes_count", ())] == 40
    assert got[("app_body_bytes_bucket", (("le", "10.0"),))] == 40
    workers = pids(admin)
    for wid, pid in workers.items():
        assert got[("app_worker_pid", (("worker", wid),))] == float(pid)
    assert text.count("# TYPE app_hits_total counter") == 1
    assert not any(name.endswith("_created") for name, _ in got)
    cmd.worker_pids.update(int(p) for p in workers.values())

    # a worker dies: the sum does not go down (its last figures are carried), and goes on counting
    os.kill(int(next(iter(workers.values()))), signal.SIGKILL)
    assert wait_until(lambda: samples(admin_get(admin, "/metrics")[1]).get(
        ("prefork_workers", (("state", "ready"),))) == 2, 30)
    cmd.track_workers(str(tmp_path / "ctl.sock"))
    assert samples(admin_get(admin, "/metrics")[1])[("app_hits_total", (("path", "/"),))] == 40
    hit(port, 10)
    assert samples(admin_get(admin, "/metrics")[1])[("app_hits_total", (("path", "/"),))] == 50


@pytest.mark.timeout(60)
def test_the_primarys_memory_stays_small(prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    """The issue's bound: under 25 MB with 2 workers and metrics on (the primary renders by hand and
    never imports prometheus_client, about 6 MB more)."""
    cmd, port, admin = serve(prefork_cmd, tmp_path, "tests.apps.prom_app:app")
    cmd.wait_ready()
    for _ in range(20):
        hit(port, 2)
        admin_get(admin, "/metrics")
    with open(f"/proc/{cmd.proc.pid}/status") as f:
        rss_kib = int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
    assert rss_kib < 25 * 1024, rss_kib
    text = admin_get(admin, "/metrics")[1]
    buckets = [line.split('le="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith("app_body_bytes_bucket")]
    assert buckets == ["1.0", "10.0", "100.0", "+Inf"]  # in their order, +Inf last


def test_figures_messages_are_checked() -> None:
    good = {"stats": {"requests": 1}, "duration": [[0] * (len(BOUNDS) + 1), 0.5],
            "families": [["x_total", "counter", "help", [["x_total", {"a": "b"}, 1.0]]]]}
    protocol.check("M", ["M", 1, good], [])
    bad = [
        ["M", 1],
        ["M", -1, good],
        ["M", 1, {"stats": {"requests": -1}}],
        ["M", 1, {"stats": {}, "duration": [[0], 0.0]}],
        ["M", 1, {"stats": {}, "families": [["bad name", "counter", "", []]]}],
        ["M", 1, {"stats": {}, "families": [["x", "weird", "", []]]}],
        ["M", 1, {"stats": {}, "families": [["x", "gauge", "", [["x", {"bad-label": "v"}, 1]]]]}],
        ["M", 1, {"stats": {}, "families": [["x", "gauge", "", [["x", {}, "1"]]]]}],
        ["M", 1, {"stats": {}, "families": [["x", "gauge", "", [["x", {}, 1]] * 10_001]]}],
    ]
    for message in bad:
        with pytest.raises(protocol.Invalid):
            protocol.check("M", message, [])
    with pytest.raises(protocol.Invalid):
        protocol.check("M", ["M", 1, good], [5])


def test_the_text_format_is_escaped() -> None:
    assert _escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert _escape_help("a\\b\nc") == "a\\\\b\\nc"
    numbers = (3, 2.0, 0.25, float("inf"), float("nan"))
    assert [_number(v) for v in numbers] == ["3", "2", "0.25", "+Inf", "NaN"]


RUN_APP = '''
from http.server import BaseHTTPRequestHandler

import prefork
from prometheus_client import Counter

HITS = Counter("script_hits", "Requests the script saw.")


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        HITS.inc()
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"ok\\n")

    def log_message(self, *args):
        pass


prefork.HTTPServer(("127.0.0.1", int(__import__("os").environ["PORT"])), Hello).serve_forever()
'''


@pytest.mark.timeout(60)
def test_prefork_run_workers_answer_a_scrape_at_once(prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    """A script's workers (no serve loop) answer on their callback lane: not after http.server's
    0.5 s poll, which would make every scrape wait for the deadline and show the previous figures."""
    script = tmp_path / "app.py"
    script.write_text(RUN_APP)
    port, admin = free_port(), free_port()
    cmd = prefork_cmd("run", "--workers", "2", "--admin", f"127.0.0.1:{admin}", "--control",
                      str(tmp_path / "ctl.sock"), str(script), env={"PORT": str(port)})
    cmd.wait_ready()
    for _ in range(7):
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text == "ok\n"
    for _ in range(3):
        reply = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10)
        assert reply.elapsed.total_seconds() < 0.45, reply.elapsed  # the deadline is 0.5 s
        got = samples(reply.text)
        assert got[("script_hits_total", ())] == 7
        assert sum(v for (name, _), v in got.items() if name == "prefork_requests_total") == 7
