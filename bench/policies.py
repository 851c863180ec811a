"""Scheduling policies side by side with Node's cluster, in one run (issue: shared ports).

    .venv/bin/python bench/policies.py [--seconds 5] [--connections 50] [--runs 1]

For prefork (rr, none, reuseport, least_conn; bench/hello_prefork.py) and Node (rr, none;
bench/node/hello.js), 2 workers each, wrk on 127.0.0.1 measures new connections per second
(`Connection: close`), keep-alive requests per second, and how connections were split between the
workers (Jain's fairness index). Then, under uneven work (one request in ten burns 20 ms of CPU,
new connection per request), p99 latency of least_conn against rr. Prints tables with ratios and
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _harness import (  # noqa: E402
    emit_records,
    ensure_wrk,
    free_port,
    jain,
    median,
    print_table,
    record,
    run_wrk,
    start_process,
    stop_process,
)

PYTHON = sys.executable
NODE = os.environ.get("NODE", "node")


def serve(kind: str, policy: str) -> tuple[list[str], dict[str, str]]:
    if kind == "node":
        return [NODE, str(HERE / "node" / "hello.js")], {"NODE_CLUSTER_SCHED_POLICY": policy}
    return [PYTHON, str(HERE / "hello_prefork.py")], {"PREFORK_SCHED_POLICY": policy}


def one(kind: str, policy: str, close: bool, seconds: float, connections: int,
        script: str | None = None) -> dict[str, Any]:
    """A fresh cluster of 2 workers, one wrk run, then the per-worker counts from the primary."""
    port = free_port()
    argv, env = serve(kind, policy)
    p = start_process(argv, env={**env, "PORT": str(port), "WORKERS": "2"})
    try:
        url = f"http://127.0.0.1:{port}/"
        if script:
            res = _wrk_script(url, seconds, connections, close, script)
        else:
            res = run_wrk(url, seconds, connections, threads=2, close=close)
    finally:
        out = stop_process(p, timeout=10)
    res.pop("raw", None)
    counts = json.loads(out.strip().splitlines()[-1])
    res["split"] = counts["per_worker_connections"]
    res["jain"] = jain(counts["per_worker_connections"])
    return res


def _wrk_script(url: str, seconds: float, connections: int, close: bool, script: str) -> dict[str, Any]:
    import subprocess

    from _harness import _parse_wrk

    argv = [ensure_wrk(), "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout=5s",
            "--latency", "-s", script]
    if close:
        argv += ["-H", "Connection: close"]
    out = subprocess.run(argv + [url], capture_output=True, text=True, timeout=seconds + 40).stdout
    return _parse_wrk(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--runs", type=int, default=1, help="median of this many runs per cell")
    args = ap.parse_args()
    ensure_wrk()
    cells = [("node", "rr"), ("node", "none"), ("prefork", "rr"), ("prefork", "none"),
             ("prefork", "reuseport"), ("prefork", "least_conn")]
    results: dict[str, Any] = {}
    for close in (True, False):
        label = "close" if close else "keep-alive"
        for kind, policy in cells:
            runs = [one(kind, policy, close, args.seconds, args.connections) for _ in range(args.runs)]
            rps = median([r["rps"] for r in runs])
            best = min(runs, key=lambda r: abs(r["rps"] - rps))
            results[f"{kind} {policy} {label}"] = {**best, "rps": rps}
    rows = []
    for label in ("close", "keep-alive"):
        for kind, policy in cells:
            r = results[f"{kind} {policy} {label}"]
            rows.append({"run": f"{kind} {policy} {label}", "rps": r["rps"], "p99_ms": r["p99_ms"],
                         "errors": r["errors"], "jain": r["jain"], "split": "/".join(map(str, r["split"]))})
    print_table(rows, ["run", "rps", "p99_ms", "errors", "jain", "split"], ratios=[])
    rps = {k: v["rps"] for k, v in results.items()}
    ratio = {
        "rr_close_vs_node_rr": rps["prefork rr close"] / rps["node rr close"],
        "rr_close_vs_own_none": rps["prefork rr close"] / rps["prefork none close"],
        "rr_keepalive_vs_node_rr": rps["prefork rr keep-alive"] / rps["node rr keep-alive"],
    }
    print()
    for k, v in ratio.items():
        print(f"{k}: {v:.2f}x")

    print("\nuneven work (10% of requests burn 20 ms; Connection: close):")
    uneven = {}
    for kind, policy in cells:
        runs = [one(kind, policy, True, args.seconds, 20, script=str(HERE / "mixed.lua"))
                for _ in range(max(1, args.runs))]
        uneven[f"{kind} {policy}"] = {key: median([r[key] for r in runs])
                                      for key in ("rps", "p50_ms", "p99_ms", "jain")}
    print_table([{"run": k, **v} for k, v in uneven.items()], ["run", "rps", "p50_ms", "p99_ms", "jain"],
                ratios=[])
    ratio["least_conn_p99_vs_rr"] = uneven["prefork least_conn"]["p99_ms"] / uneven["prefork rr"]["p99_ms"]
    print(f"least_conn p99 / rr p99: {ratio['least_conn_p99_vs_rr']:.2f}x (below 1 is better)")
    emit_records(records(results, uneven), results=results, uneven=uneven, ratios=ratio)


def records(results: dict[str, Any], uneven: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures as scripts/bench's records: per policy, rate, latency and the split's fairness."""
    out = []
    cases = [(f"hello, {label}", f" {label}", results) for label in ("close", "keep-alive")]
    cases.append(("uneven work, close", "", uneven))
    for case, suffix, table in cases:
        for key, r in table.items():
            if not key.endswith(suffix):
                continue
            subject = key[: len(key) - len(suffix)]
            out += [record("policies", case, subject, "req/s", r["rps"], "req/s"),
                    record("policies", case, subject, "p50 ms", r["p50_ms"], "ms", higher=False),
                    record("policies", case, subject, "p99 ms", r["p99_ms"], "ms", higher=False),
                    record("policies", case, subject, "Jain", r["jain"], "")]
    return out


if __name__ == "__main__":
    main()
