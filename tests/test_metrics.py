"""The primary's /metrics (src/prefork/metrics.py): prefork's own figures, exact after N requests, and
an app's prometheus_client metrics merged across its workers; the "M" message's checks."""

from __future__ import annotations

import os
import re
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
from prefork.metrics_text import Digested, digest
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


def checked(message: list) -> Digested:
    """What the primary checks of an "M" before it uses it: the envelope, then each line (digest)."""
    protocol.check("M", message, [])
    steps = digest(1, message[2], 10_000, 4 << 20, {}, 100)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def test_figures_messages_are_checked() -> None:
    good = {"stats": {"requests": 1}, "duration": [[0] * (len(BOUNDS) + 1), 0.5],
            "families": [["x_total", "counter", "help", 'x_total{a="b"} 1.0\n', ""],
                         ["h", "histogram", "", 'h_bucket{le="+Inf"} 2\nh_sum -1e+20\n', ""],
                         ["g", "gauge", "", "", 'g{worker="x"} NaN\ng +Inf\ng 3\n'],
                         ["prefork_ready", "gauge", "", "", "prefork_ready 0\n"]]}
    families = checked(["M", 1, good]).families
    assert families["g"] == ("gauge", "", b'g{worker="x",prefork_worker="1"} NaN\ng{worker="1"} +Inf\n')
    assert families["h"][1] == 'h_bucket{le="+Inf"} 2\nh_sum -1e+20\n'
    assert "prefork_ready" not in families  # prefork's own names are dropped
    fam = "families"
    bad = [
        ["M", 1],
        ["M", -1, good],
        ["M", 1, {"stats": {"requests": -1}}],
        ["M", 1, {"stats": {"requests": 2**63}}],  # would overflow a float sum
        ["M", 1, {"stats": {"requests": 10**400}}],
        ["M", 1, {"stats": {}, "duration": [[0], 0.0]}],
        ["M", 1, {"stats": {}, "duration": [[0] * (len(BOUNDS) + 1), 10**400]}],
        ["M", 1, {"stats": {}, fam: [["bad name", "counter", "", "", ""]]}],
        ["M", 1, {"stats": {}, fam: [["x", "weird", "", "", ""]]}],
        ["M", 1, {"stats": {}, fam: [["x", "gauge", "", [["x", {}, 1]], ""]]}],  # lists: the old form
        ["M", 1, {"stats": {}, fam: [["x", "gauge", "", "", 'x{bad-label="v"} 1\n']]}],
        ["M", 1, {"stats": {}, fam: [["x", "gauge", "", "", 'x{a="b",a="c"} 1\n']]}],
        ["M", 1, {"stats": {}, fam: [["x", "gauge", "", "", 'x{a="b"""} 1\n']]}],
        ["M", 1, {"stats": {}, fam: [["x", "gauge", "", "", "x 1_0\n"]]}],
        ["M", 1, {"stats": {}, fam: [["x", "gauge", "", "", "x 1\n# HELP x y\n"]]}],
        ["M", 1, {"stats": {}, fam: [["x", "gauge", "", "", "x 1"]]}],  # no newline
        ["M", 1, {"stats": {}, fam: [["x", "gauge", "", "", "x 1\n" * 10_001]]}],
        # a sample named as another family's series, or as prefork's own
        ["M", 1, {"stats": {}, fam: [["x", "gauge", "", "", "prefork_ready 1\n"]]}],
        ["M", 1, {"stats": {}, fam: [["x", "gauge", "", "", "x_other 1\n"]]}],
        # a summed sample in the worker's own lines, or the other way round
        ["M", 1, {"stats": {}, fam: [["x_total", "counter", "", "", "x_total 1\n"]]}],
        ["M", 1, {"stats": {}, fam: [["x", "gauge", "", "x 1\n", ""]]}],
    ]
    for message in bad:
        with pytest.raises(protocol.Invalid):
            checked(message)
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
        got = samples(reply.text)
        assert got[("script_hits_total", ())] == 7
        assert sum(v for (name, _), v in got.items() if name == "prefork_requests_total") == 7


HOSTILE = '''
import time, prefork
from prefork import _role
if prefork.is_worker:
    child = _role.child

    def on_m(message, fds):  # a worker that sends what a well-behaved one never would
        bad = [{"stats": {"requests": 10**400}},
               {"stats": {"requests": 1}, "families": [["ok", "gauge", "x", "", "prefork_ready 0\\n"]]},
               {"stats": {"requests": 1}, "families": [["ok", "gauge", "x", "", "ok 10_0\\n"]]}]
        for figures in bad:
            child.channel.send_internal(["M", message[1], figures])
        good = [["fine_total", "counter", "x", "fine_total 5\\nfine_total 6\\n", ""],
                ["prefork_requests_total", "counter", "x", "prefork_requests_total 7\\n", ""]]
        child.channel.send_internal(["M", message[1], {"stats": {"requests": 1}, "families": good}])
    child.internal["m"] = on_m
    while True:
        time.sleep(1)
'''


@pytest.mark.timeout(60)
def test_a_workers_bad_figures_cost_it_not_the_scrape(prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    """An int too big for a float sum, a sample named as prefork's own, a bad number: refused; a
    prefork_* family and a repeated series: dropped, in the live figures and in an exited worker's
    carried ones; /metrics stays a 200."""
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE)
    admin = free_port()
    cmd = prefork_cmd("run", "--workers", "1", "--ready", "online", "--admin", f"127.0.0.1:{admin}",
                      "--control", str(tmp_path / "ctl.sock"), str(script))
    cmd.wait_ready()
    cmd.track_workers(str(tmp_path / "ctl.sock"))

    def scrape() -> dict:
        status, text = admin_get(admin, "/metrics")
        assert status == 200, text
        return samples(text)

    assert wait_until(lambda: scrape().get(("fine_total", ())) == 5, 20), cmd.output
    got = scrape()
    assert ("ok", ()) not in got
    own = [k for k in got if k[0] == "prefork_requests_total"]
    assert own == [("prefork_requests_total", (("worker", "1"),))], own
    assert got[("prefork_ready", ())] == 1
    os.kill(next(iter(cmd.worker_pids)), signal.SIGKILL)  # its last figures are carried
    assert wait_until(lambda: ("prefork_requests_total", (("worker", "2"),)) in scrape(), 30)
    assert wait_until(lambda: scrape().get(("fine_total", ())) == 10, 20), cmd.output
    got = scrape()
    assert sum(v for k, v in got.items() if k[0] == "prefork_requests_total") == 1
    assert "Traceback" not in cmd.output and "OverflowError" not in cmd.output, cmd.output
    assert "sent a bad 'M' message" in cmd.output


BIG = '''
import os, time, prefork
from prometheus_client import Counter, Gauge
if prefork.is_worker:
    n = int(os.environ["SERIES"])
    gauge = Gauge("big_gauge", "Many series.", ["k"])
    counter = Counter("big_counter", "Many series.", ["k"])
    for i in range(n):
        gauge.labels(k=f"g{i}").set(i)
        counter.labels(k=f"c{i}").inc()
    while True:
        time.sleep(1)
'''


@pytest.mark.timeout(90)
def test_a_scrapes_budget_is_shared_by_the_workers(prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    """3 workers of 2 x 6,000 series each: a scrape takes at most 20,000 samples of them in all; each
    worker is cut to its share, which /metrics and the log (once) say; the primary stays under 25 MB."""
    script = tmp_path / "big.py"
    script.write_text(BIG)
    admin = free_port()
    cmd = prefork_cmd("run", "--workers", "3", "--ready", "online", "--admin", f"127.0.0.1:{admin}",
                      "--control", str(tmp_path / "ctl.sock"), str(script), env={"SERIES": "6000"})
    cmd.wait_ready()
    assert wait_until(lambda: len(samples(admin_get(admin, "/metrics")[1])) > 1000, 30)
    got = samples(admin_get(admin, "/metrics", timeout=20)[1])
    app = [k for k in got if k[0].startswith("big_")]
    assert 3 * 200 <= len(app) <= 20_000, len(app)
    truncated = {k[1]: v for k, v in got.items() if k[0] == "prefork_metrics_truncated"}
    assert len(truncated) == 3 and set(truncated.values()) == {1}, truncated
    cmd.expect(r"/metrics: worker \d+'s figures were cut", 10)
    for _ in range(10):  # with 36,000 series in the workers the primary stays small
        assert admin_get(admin, "/readyz")[0] == 200
        assert admin_get(admin, "/metrics", timeout=20)[0] == 200
    with open(f"/proc/{cmd.proc.pid}/status") as f:
        rss_kib = int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
    assert rss_kib < 25 * 1024, rss_kib  # the bound of test_the_primarys_memory_stays_small
    assert len(re.findall("figures were cut", cmd.output)) == 1, cmd.output  # once
