"""Respawn latency and reload errors, prefork side by side with Node's cluster (issue: lifecycle).

    .venv/bin/python bench/lifecycle.py [--kills 10] [--reloads 3] [--seconds 8]

Respawn: one worker, SIGKILLed `--kills` times; median ms from the kill to the new worker's online
and listening events, for Node (bench/node/reload_master.js MODE=respawn), prefork starting fresh
interpreters, and prefork forking preloaded workers (START=fork), both supervised
(bench/hello_prefork.py MODE=supervised).
Reload: 2 workers under a wrk load (keep-alive, then Connection: close), `--reloads` SIGHUPs;
errors wrk counted (socket errors and non-2xx), for Node's master.js with kill() and with
disconnect(), and prefork's rolling reload under each scheduling policy.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _harness import (  # noqa: E402
    emit_records,
    ensure_wrk,
    free_port,
    median,
    print_table,
    record,
    run_wrk,
    start_process,
    stop_process,
)
from node_baseline import bench_respawn  # noqa: E402

PYTHON = sys.executable
NODE = os.environ.get("NODE", "node")


def command(kind: str) -> tuple[list[str], dict[str, str]]:
    """kind: node-kill, node-disconnect, node-respawn, prefork-<policy>[-fork]."""
    if kind.startswith("node-"):
        return [NODE, str(HERE / "node" / "reload_master.js")], {"MODE": kind[5:]}
    parts = kind.split("-")
    env = {"MODE": "supervised", "PREFORK_SCHED_POLICY": parts[1]}
    if len(parts) > 2:
        env["START"] = parts[2]
    return [PYTHON, str(HERE / "hello_prefork.py")], env


def respawn(kind: str, kills: int) -> dict[str, float]:
    """Past the supervisor's one second of MIN_UPTIME between kills: kills, not a crash loop."""
    argv, env = command(kind)
    return bench_respawn(kills, argv=argv, env=env, pause=1.2)


def reload_under_load(kind: str, close: bool, reloads: int, seconds: float) -> dict[str, Any]:
    argv, env = command(kind)
    port = free_port()
    p = start_process(argv, env={**env, "PORT": str(port), "WORKERS": "2"})
    box: dict[str, Any] = {}
    load = threading.Thread(target=lambda: box.update(
        run_wrk(f"http://127.0.0.1:{port}/", seconds, 50, threads=2, close=close)))
    took: list[float] = []
    try:
        load.start()
        time.sleep(1.0)
        gap = max(0.5, (seconds - 2.0) / max(1, reloads))
        for _ in range(reloads):
            start = time.monotonic()
            os.kill(p.pid, signal.SIGHUP)
            p.wait_line(b"reloaded", 30)
            took.append((time.monotonic() - start) * 1000)
            time.sleep(gap)
        load.join()
    finally:
        stop_process(p, timeout=15)
    return {"reloads": len(took), "reload_ms": median(took) if took else None,
            **{k: box.get(k) for k in ("errors", "requests", "rps")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--reloads", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    ensure_wrk()
    out: dict[str, Any] = {"respawn": {}, "reload": {}}
    for kind in ("node-respawn", "prefork-rr", "prefork-rr-fork"):
        out["respawn"][kind] = respawn(kind, args.kills)
    node = out["respawn"]["node-respawn"]
    rows = [{"run": k, **v, "listening_vs_node": v["kill_to_listening_ms"] / node["kill_to_listening_ms"]}
            for k, v in out["respawn"].items()]
    print("respawn, median of", args.kills, "kills (ms)")
    print_table(rows, ["run", "kill_to_online_ms", "kill_to_listening_ms", "listening_vs_node"], ratios=[])
    print()
    kinds = ("node-kill", "node-disconnect", "prefork-rr", "prefork-none", "prefork-reuseport",
             "prefork-least_conn")
    rows = []
    for close in (False, True):
        for kind in kinds:
            r = reload_under_load(kind, close, args.reloads, args.seconds)
            label = f"{kind} {'close' if close else 'keep-alive'}"
            out["reload"][label] = r
            rows.append({"run": label, **r})
    print(f"reload under load ({args.reloads} reloads, 2 workers, wrk 50 connections, {args.seconds:g} s)")
    print_table(rows, ["run", "reloads", "reload_ms", "errors", "requests", "rps"], ratios=[])
    emit_records(records(out), **out)


NAMES = {"node-respawn": "node", "prefork-rr": "prefork, fresh interpreter",
         "prefork-rr-fork": "prefork, forked (preload)"}


def records(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures as scripts/bench's records."""
    recs = []
    for kind, r in out["respawn"].items():
        subject = NAMES.get(kind, kind)
        recs.append(record("lifecycle", "respawn, kill to online", subject, "ms", r["kill_to_online_ms"],
                           "ms", higher=False))
        recs.append(record("lifecycle", "respawn, kill to listening", subject, "ms",
                           r["kill_to_listening_ms"], "ms", higher=False))
    for label, r in out["reload"].items():
        kind, mode = label.rsplit(" ", 1)
        subject = kind.replace("-", " ", 1)
        case = f"reload under load, {mode}"
        recs.append(record("lifecycle", case, subject, "errors", r["errors"], "", higher=False))
        recs.append(record("lifecycle", case, subject, "reload ms", r["reload_ms"], "ms", higher=False))
    return recs


if __name__ == "__main__":
    main()
