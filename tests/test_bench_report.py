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
