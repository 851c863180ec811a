"""Node.js cluster baseline: runs bench/node/*.js through _harness and prints the numbers.

    python bench/node_baseline.py [--ipc-runs 3] [--http-seconds 5] [--connections 50] [--kills 10]

It doubles as the reference for how a Python bench drives the Node side (a prefork column can
be added next to each "node" value). Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    Proc,
    ensure_wrk,
    free_port,
    jain,
    median,
    print_table,
    run_wrk,
    start_process,
    stop_process,
)

NODE = os.environ.get("NODE", "node")
HERE = Path(__file__).resolve().parent / "node"


def bench_ipc(runs: int, seconds: float) -> dict[str, float]:
    """Median of `runs` runs of ipc.js (each prints one JSON line)."""
    results: list[dict[str, float]] = []
    for _ in range(runs):
        p = start_process([NODE, str(HERE / "ipc.js"), str(seconds)], ready_line=None)
        line = p.next_line(timeout=seconds * 8 + 30)
        stop_process(p, timeout=5)
        results.append(json.loads(line))
    return {k: median([r[k] for r in results]) for k in results[0]}


def bench_http(policy: str, close: bool, seconds: float, connections: int, workers: int) -> dict[str, Any]:
    """One fresh hello.js cluster, one wrk run, then the per-worker counts from the primary."""
    port = free_port()
    env = {"PORT": str(port), "WORKERS": str(workers), "NODE_CLUSTER_SCHED_POLICY": policy}
    p = start_process([NODE, str(HERE / "hello.js")], env=env)
    try:
        res = run_wrk(f"http://127.0.0.1:{port}/", seconds, connections, threads=2, close=close)
    finally:
        out = stop_process(p, timeout=10)
    counts = json.loads(out.strip().splitlines()[-1])
    res.pop("raw")
    res["per_worker_requests"] = counts["per_worker_requests"]
    res["per_worker_connections"] = counts["per_worker_connections"]
    res["jain_requests"] = jain(counts["per_worker_requests"])
    res["jain_connections"] = jain(counts["per_worker_connections"])
    return res


def _event(p: Proc, name: str, pid: int | None, timeout: float) -> dict[str, Any]:
    """Next respawn event `name`, for a pid other than `pid` (the one just killed)."""
    while True:
        ev: dict[str, Any] = json.loads(p.wait_line(lambda b: b.startswith(b"{"), timeout))
        if ev["event"] == name and ev["pid"] != pid:
            return ev


def bench_respawn(kills: int, sig: int = signal.SIGKILL, argv: list[str] | None = None,
                  env: dict[str, str] | None = None, pause: float = 0.2) -> dict[str, float]:
    """Kill the single worker `kills` times; median ms from kill to new worker online/listening.

    Node's process.hrtime and Python's time.monotonic both read CLOCK_MONOTONIC on Linux. `argv`
    and `env` run another cluster that prints the same JSON event lines (bench/lifecycle.py's
    prefork side); `pause` is the wait between kills.
    """
    port = free_port()
    argv = argv or [NODE, str(HERE / "reload_master.js")]
    p = start_process(argv, env={"PORT": str(port), "MODE": "respawn", "WORKERS": "1", **(env or {})})
    online: list[float] = []
    listening: list[float] = []
    try:
        pid = next(json.loads(x)["pid"] for x in reversed(p.output) if x.startswith(b"{"))
        for _ in range(kills):
            t_kill = time.monotonic() * 1000.0
            os.kill(pid, sig)
            on = _event(p, "online", pid, 10)
            ls = _event(p, "listening", pid, 10)
            online.append(on["t"] - t_kill)
            listening.append(ls["t"] - t_kill)
            pid = ls["pid"]
            time.sleep(pause)
    finally:
        stop_process(p, timeout=5)
    return {"kill_to_online_ms": median(online), "kill_to_listening_ms": median(listening)}


def bench_reload(mode: str, reloads: int) -> float:
    """Median ms from SIGHUP to "reloaded" (new workers listening, old ones exited), idle server."""
    port = free_port()
    p = start_process(
        [NODE, str(HERE / "reload_master.js")], env={"PORT": str(port), "MODE": mode, "WORKERS": "2"}
    )
    times: list[float] = []
    try:
        for _ in range(reloads):
            t0 = time.monotonic()
            os.kill(p.pid, signal.SIGHUP)
            p.wait_line(b"reloaded", 15)
            times.append((time.monotonic() - t0) * 1000.0)
    finally:
        stop_process(p, timeout=5)
    return median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ipc-runs", type=int, default=3)
    ap.add_argument("--ipc-seconds", type=float, default=2.0)
    ap.add_argument("--http-seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="also print all results as one JSON line")
    args = ap.parse_args()
    ensure_wrk()

    results: dict[str, Any] = {"ipc": bench_ipc(args.ipc_runs, args.ipc_seconds)}
    print_table([{"metric": k, "node": v} for k, v in results["ipc"].items()], ["metric", "node"])
    print()

    rows = []
    for policy in ("rr", "none"):
        for close in (False, True):
            name = f"{policy} {'close' if close else 'keep-alive'}"
            r = bench_http(policy, close, args.http_seconds, args.connections, args.workers)
            results[name] = r
            rows.append({"run": name, **{k: v for k, v in r.items() if not k.startswith("per_")}})
            rows[-1]["per_worker_req"] = "/".join(str(x) for x in r["per_worker_requests"])
    cols = ["run", "rps", "p50_ms", "p99_ms", "errors", "jain_requests", "jain_connections", "per_worker_req"]
    print_table(rows, cols, ratios=[])
    print()

    results["respawn"] = bench_respawn(args.kills)
    results["reload_kill_ms"] = bench_reload("kill", 5)
    results["reload_disconnect_ms"] = bench_reload("disconnect", 5)
    other = {**results["respawn"]}
    other["sighup_to_reloaded_ms (kill)"] = results["reload_kill_ms"]
    other["sighup_to_reloaded_ms (disconnect)"] = results["reload_disconnect_ms"]
    print_table([{"metric": k, "node": v} for k, v in other.items()], ["metric", "node"])
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
