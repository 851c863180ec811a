"""scripts/bench's report: medians of the rounds, min-max, ratios to each peer, the targets."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def report():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_all", BENCH / "all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCH))


def _rec(case, subject, metric, value, higher=True, bench="policies"):
    return {
        "bench": bench,
        "case": case,
        "subject": subject,
        "metric": metric,
        "value": value,
        "unit": "",
        "higher": higher,
    }


def test_median_min_max_over_rounds(report):
    records = [_rec("hello, close", "prefork rr", "req/s", v) for v in (30.0, 10.0, 20.0)]
    records.append(_rec("hello, close", "prefork rr", "req/s", None))  # a failed measurement
    summary = report.summarize(records)
    s = summary[("policies", "hello, close", "prefork rr", "req/s")]
    assert (s["median"], s["min"], s["max"], s["n"]) == (20.0, 10.0, 30.0, 3)


def test_table_shows_ratio_of_prefork_to_each_peer(report):
    records = [
        _rec("hello, close", "prefork rr", "req/s", 3000.0),
        _rec("hello, close", "node rr", "req/s", 1000.0),
        _rec("hello, close", "node none", "req/s", 2000.0),
    ]
    table = report.markdown(report.summarize(records))
    assert "| node rr | 1,000 | 3.00x |" in table
    assert "| node none | 2,000 | 1.50x |" in table
    assert "| prefork rr | 3,000 |  |" in table


def test_targets_pass_and_miss(report):
    records = [
        _rec("hello, close", "prefork rr", "req/s", 3000.0),
        _rec("hello, close", "node rr", "req/s", 1000.0),
        _rec("hello, close", "prefork none", "req/s", 4000.0),
        _rec("memory, 2 workers", "prefork serve", "primary RSS MB", 30.0, False, bench="scale"),
    ]
    results = {
        label: (status, figure) for status, label, figure in report.check_targets(report.summarize(records))
    }
    assert results["RR hand-off at least 1.5x Node's RR primary"] == ("PASS", "3.00x (target >= 1.5)")
    assert results["RR within 10% of prefork's own SCHED_NONE"][0] == "MISS"
    assert results["primary at most 25 MB RSS (prefork serve, 2 workers)"] == ("MISS", "30.0 (target <= 25)")
    assert results["ASGI keep-alive at least uvicorn's"] == ("n/a", "not measured")


def test_readme_block_is_replaced_between_markers(report, tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("head\n<!-- bench:start -->\nold\n<!-- bench:end -->\ntail\n")
    monkeypatch.setattr(report, "ROOT", tmp_path)
    assert report.write_readme("new table")
    assert (
        tmp_path / "README.md"
    ).read_text() == "head\n<!-- bench:start -->\nnew table\n<!-- bench:end -->\ntail\n"


@pytest.fixture(scope="module")
def deploys():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_deploys", BENCH / "deploys.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCH))


def test_deploys_records_feed_the_issue_12_targets(report, deploys):
    """The names bench/deploys.py emits are the ones the targets table looks up (a renamed subject
    or metric would leave a target 'not measured' for good)."""
    out = {
        "respawn": {"prefork serve --no-preload": {"served_ms": 20.0, "ready_line_ms": 19.0},
                    "prefork serve --preload": {"served_ms": 5.0, "ready_line_ms": None},
                    "node cluster": {"served_ms": 40.0, "ready_line_ms": None}},
        "memory": {"prefork serve --no-preload": {"worker_uss_mb": 30.0, "worker_pss_mb": 32.0,
                                                  "primary_rss_mb": 20.0, "others_rss_mb": None,
                                                  "tree_pss_mb": 150.0},
                   "prefork serve --preload": {"worker_uss_mb": 15.0, "worker_pss_mb": 19.0,
                                               "primary_rss_mb": 20.0, "others_rss_mb": 40.0,
                                               "tree_pss_mb": 100.0}},
        "reload": {"prefork serve --no-preload": {"replaced_ms": 300.0, "new_ready_ms": 250.0},
                   "node cluster (kill)": {"replaced_ms": 150.0, "new_ready_ms": None}},
    }
    records = deploys.records(out)
    assert not [r for r in records if r["value"] is None]  # a figure not measured is left out
    results = {label: (status, figure)
               for status, label, figure in report.check_targets(report.summarize(records))}
    assert results["serve --no-preload: respawn to a served request at most a quarter of Node's"] == (
        "MISS", "0.50x (target <= 0.25)")
    default = "serve (default: --preload): "
    assert results[default + "respawn to a served request at most a quarter of Node's"][0] == "PASS"
    assert results["serve --preload: per-worker USS at least 30% below --no-preload (Django, 4 workers)"] == (
        "PASS", "0.50x (target <= 0.7)")
    assert results["serve --no-preload: reload (SIGHUP, 2 workers) no slower than Node's master.js"] == (
        "MISS", "2.00x (target <= 1)")
    assert results[default + "reload (SIGHUP, 2 workers) no slower than Node's master.js"][0] == "n/a"


def test_smaps_rollup_uss_is_private_clean_plus_dirty():
    sys.path.insert(0, str(BENCH))
    try:
        from _procs import parse_rollup
    finally:
        sys.path.remove(str(BENCH))
    text = (
        "55d0c0a4e000-7ffd1c9f3000 ---p 00000000 00:00 0                          [rollup]\n"
        "Rss:               46312 kB\nPss:               34310 kB\nShared_Clean:      13500 kB\n"
        "Private_Clean:       812 kB\nPrivate_Dirty:     32000 kB\nSwap:                  0 kB\n"
    )
    got = parse_rollup(text)
    assert got["uss"] == (812 + 32000) * 1024
    assert (got["Rss"], got["Pss"]) == (46312 * 1024, 34310 * 1024)
