"""How prefork's cost grows with the number of workers, side by side with Node's cluster.

    .venv/bin/python bench/scale.py [--workers 1,2,4,8,16] [--policies rr,none] [--seconds 3]
                                    [--rounds 1] [--connections 32]

(a) Hand-off rate: bench/hello_prefork.py (PREFORK_SCHED_POLICY=rr and none) and
    bench/node/hello.js (NODE_CLUSTER_SCHED_POLICY=rr) for each worker count, wrk on 127.0.0.1 with
    `Connection: close` (a new connection per request): new connections per second.
(b) Primary CPU per 1,000 connections: the primary's user+system CPU time over the wrk run divided
    by the requests wrk made. With rr the primary accepts every connection and passes it on, so
    this is the hand-off cost; with none the workers accept themselves and it is near zero.
(c) Memory, after the cluster is ready and has served a short load: primary RSS/USS/PSS, mean
    worker RSS and USS (children of the primary, psutil), and the whole cluster's PSS, for the
    library (hello_prefork.py, read from its rr run), `prefork serve tests.apps.hello:asgi`
    (its default policy) and Node's cluster (its rr run). Checks the issue's target: the
    primary at most 25 MB RSS, for both prefork forms.

With --rounds N every subject is measured once per round, interleaved, and medians are shown.
Prints tables, then as the last stdout line the records (`emit_records`).

Where the curves bend, and why (scripts/bench, 3 rounds, 2026-11-26 02:20; 2 cores shared by wrk and
the cluster). prefork rr made 23.8k, 27.5k, 23.5k, 18.1k, 15.0k new connections/s with 1, 2, 4, 8,
16 workers; none 19.7k, 31.9k, 19.1k, 13.1k, 10.2k; Node rr 8.6k, 8.2k, 5.8k, 4.3k, 4.0k. Both
prefork curves peak at 2 workers, one per core, and fall once workers outnumber cores: each
connection then costs more context switches and each wake-up carries fewer connections. none falls
hardest: every worker waiting on the shared socket is woken for each connection and all but one
find nothing, so from 4 workers on rr is the faster (1.2x at 4, 1.4x at 8). The primary's cost does
not grow with workers: 8.0 to 10.5 ms of CPU per 1,000 connections from 1 to 16 (one accept, a share
of one sendmsg and one close_range per wake-up; Node's rr primary 38 to 44 ms). At 2 workers that
share keeps rr at 0.86x of none here (32 connections; 0.93x in bench/policies.py with 50, where
wake-ups carry more). Memory: the primary is 13.5 MB RSS with 1 worker and 17.5 MB with 16
(library; serve 17.0 to 21.0 MB), about 0.25 MB per worker (its channel, links and bookkeeping); a
worker adds 12.3 MB USS (library) or 19.2 MB (serve, with uvicorn, uvloop and httptools).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _harness import (  # noqa: E402
    Proc,
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
    wait_http,
)

ROOT = HERE.parent
PYTHON = sys.executable
PREFORK = str(ROOT / ".venv" / "bin" / "prefork")
NODE = os.environ.get("NODE", "node")
MB = 1024 * 1024
TARGET_PRIMARY_RSS_MB = 25.0
MEM_KEYS = ("primary_rss", "primary_uss", "primary_pss", "worker_rss", "worker_uss", "cluster_pss")


def _clean_env() -> dict[str, str]:
    """os.environ without PREFORK_*/NODE_CLUSTER_* so only what a subject sets applies."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFORK_", "NODE_CLUSTER_"))}


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _wakeups(pid: int) -> int:
    """Voluntary context switches of every thread of pid (/proc/<pid>/status has the leader's only)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def _cpu_all(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            total += _cpu_s(proc)
        except psutil.NoSuchProcess:
            pass
    return total


def memory(pid: int) -> dict[str, float]:
    """Primary RSS/USS/PSS, mean worker RSS/USS, and the cluster's total PSS, in MB."""
    primary = psutil.Process(pid)
    pm = primary.memory_full_info()
    workers = []
    for child in primary.children(recursive=True):
        try:
            workers.append(child.memory_full_info())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    n = max(1, len(workers))
    return {
        "primary_rss": pm.rss / MB,
        "primary_uss": pm.uss / MB,
        "primary_pss": pm.pss / MB,
        "worker_rss": sum(w.rss for w in workers) / n / MB,
        "worker_uss": sum(w.uss for w in workers) / n / MB,
        "cluster_pss": (pm.pss + sum(w.pss for w in workers)) / MB,
        "nworkers": float(len(workers)),
    }


def _counts(out: str) -> list[int] | None:
    """Per-worker connection counts from the JSON line the hello servers print when stopped."""
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                counts = json.loads(line)["per_worker_connections"]
            except (ValueError, KeyError):
                return None
            return counts if counts and all(isinstance(c, int) for c in counts) else None
    return None


def handoff(kind: str, policy: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """A fresh hello cluster, one wrk run with Connection: close, primary CPU around it, memory."""
    port = free_port()
    if kind == "node":
        argv = [NODE, str(HERE / "node" / "hello.js")]
        env = {"NODE_CLUSTER_SCHED_POLICY": policy}
    else:
        argv = [PYTHON, str(HERE / "hello_prefork.py")]
        env = {"PREFORK_SCHED_POLICY": policy}
    env.update(PORT=str(port), WORKERS=str(workers))
    # start_process merges os.environ: strip inherited PREFORK_*/NODE_CLUSTER_* for the start
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(("PREFORK_", "NODE_CLUSTER_"))}
    try:
        p = start_process(argv, env=env, timeout=20.0 + 2.0 * workers)
    finally:
        os.environ.update(saved)
    out = ""
    try:
        primary = psutil.Process(p.pid)
        kids = primary.children(recursive=True)
        cpu0, wcpu0, t0 = _cpu_s(primary), _cpu_all(kids), time.monotonic()
        wake0 = _wakeups(p.pid)
        res = run_wrk(f"http://127.0.0.1:{port}/", args.seconds, args.connections, threads=2,
                      close=True, latency=False)
        cpu1, wcpu1, t1 = _cpu_s(primary), _cpu_all(kids), time.monotonic()
        wake1 = _wakeups(p.pid)
        mem = memory(p.pid)
    finally:
        out = stop_process(p, timeout=10.0)
    requests = res["requests"] or 0
    if not requests:
        raise RuntimeError(f"no request served (wrk errors: {res['errors']}); output: {out[-300:]!r}")
    counts = _counts(out)
    return {
        "rps": res["rps"],
        "errors": res["errors"],
        "cpu_ms_per_1k": (cpu1 - cpu0) * 1000.0 / requests * 1000.0 if requests else None,
        "primary_busy": (cpu1 - cpu0) / (t1 - t0) * 100.0,
        "wakes_per_1k": (wake1 - wake0) * 1000.0 / requests if requests else None,
        "cluster_ms_per_1k": (cpu1 - cpu0 + wcpu1 - wcpu0) * 1000.0 / requests * 1000.0 if requests else None,
        "jain": jain(counts) if counts else None,
        **mem,
    }


def serve_memory(workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """`prefork serve` hello (ASGI), ready, 1 s of load, then memory."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory(prefix="prefork-scale-") as tmp, \
            open(os.path.join(tmp, "stderr.log"), "w+b") as err:
        argv = [PREFORK, "serve", "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
                "--log-level", "warning", "--no-access-log", "--control", os.path.join(tmp, "ctl.sock"),
                "tests.apps.hello:asgi"]
        env = {**_clean_env(), "PYTHONPATH": str(ROOT)}
        p = Proc(argv, env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                 stderr=err, start_new_session=True)
        p._start_reader()
        try:
            wait_http(url, 20.0 + 2.0 * workers, p)
            run_wrk(url, 1, args.connections, threads=2, close=True, latency=False)
            return memory(p.pid)
        except Exception:
            err.seek(0)
            sys.stderr.write(err.read().decode(errors="replace")[-2000:])
            raise
        finally:
            stop_process(p, timeout=10.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4,8,16", help="comma-separated worker counts")
    ap.add_argument("--policies", default="rr,none", help="prefork scheduling policies for the hand-off runs")
    ap.add_argument("--seconds", type=float, default=3.0, help="wrk duration per hand-off run")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians shown)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (2 threads)")
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    ensure_wrk()
    started = time.monotonic()

    # subject -> (kind, policy); hand-off subjects, then which run gives each memory subject
    hsubjects: dict[str, tuple[str, str]] = {f"prefork {pol}": ("prefork", pol) for pol in policies}
    have_node = shutil.which(NODE) is not None
    if have_node:
        hsubjects["node rr"] = ("node", "rr")
    else:
        print(f"skipping node: {NODE!r} not found", file=sys.stderr)
    lib_from = "prefork rr" if "prefork rr" in hsubjects else next(iter(hsubjects), None)
    msubjects = {"prefork library": lib_from, "prefork serve": None}
    if have_node:
        msubjects["node"] = "node rr"

    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        for n in counts:
            for name in [*hsubjects, "prefork serve"]:
                try:
                    if name == "prefork serve":
                        res = serve_memory(n, args)
                    else:
                        res = handoff(*hsubjects[name], n, args)
                except Exception as exc:  # one failed cell must not lose the others
                    print(f"round {rnd + 1}: {name}, {n} workers failed: {exc}", file=sys.stderr)
                    continue
                runs.setdefault((n, name), []).append(res)
                if "rps" in res:
                    print(f"round {rnd + 1}/{args.rounds} {n:3d} workers {name:13s} {res['rps']:8.0f} conn/s "
                          f"primary {res['cpu_ms_per_1k'] or 0:6.1f} ms/1k conn, {res['primary_busy']:5.1f}% "
                          f"of a core  primary RSS {res['primary_rss']:5.1f} MB  errors {res['errors']}",
                          flush=True)
                else:
                    print(f"round {rnd + 1}/{args.rounds} {n:3d} workers {name:13s} primary RSS "
                          f"{res['primary_rss']:5.1f} MB  worker USS {res['worker_uss']:5.1f} MB", flush=True)

    def med(n: int, name: str | None, key: str) -> float | None:
        vals = [r[key] for r in runs.get((n, name or ""), []) if r.get(key) is not None]
        return median(vals) if vals else None

    records: list[dict[str, Any]] = []
    hnames = list(hsubjects)
    ratios = [(a, b) for a, b in (("prefork rr", "node rr"), ("prefork rr", "prefork none"))
              if a in hnames and b in hnames]
    tables = {
        "rps": "new connections per second (Connection: close)",
        "cpu_ms_per_1k": "primary CPU ms per 1,000 connections",
        "primary_busy": "primary CPU, % of one core during the run",
        "wakes_per_1k": "primary wake-ups (voluntary context switches) per 1,000 connections",
        "cluster_ms_per_1k": "primary + workers CPU ms per 1,000 connections (wrk, softirq not counted)",
        "jain": "connection split over workers (Jain's index: 1 even, 1/n one takes all)",
    }
    print()
    print(f"hand-off: hello world, wrk -t2 -c{args.connections} -H 'Connection: close', "
          f"{args.seconds:g} s, median of {args.rounds} round(s)")
    for key, title in tables.items():
        print(f"\n{title}")
        rows = [{"workers": n, **{name: med(n, name, key) for name in hnames}} for n in counts]
        keep = ratios if key in ("rps", "cluster_ms_per_1k") else [r for r in ratios if r[1] == "node rr"]
        print_table(rows, ["workers", *hnames], ratios=keep if key != "jain" else [])
    errors = sum(r.get("errors") or 0 for rs in runs.values() for r in rs)
    if errors:
        print(f"\nwrk reported {errors} socket errors / non-2xx responses in total")
    for n in counts:
        for name in hnames:
            case = f"hand-off, {n} workers"
            records.append(record("scale", case, name, "conn/s", med(n, name, "rps"), "conn/s", True))
            records.append(record("scale", case, name, "primary CPU ms per 1k conn",
                                  med(n, name, "cpu_ms_per_1k"), "ms", False))

    print("\nmemory after a short load (MB; USS = private to the process, PSS = shared pages split)")
    rows = []
    for name, source in msubjects.items():
        src = "prefork serve" if name == "prefork serve" else source
        for n in counts:
            row: dict[str, Any] = {"subject": name, "workers": n}
            row.update({k: med(n, src, k) for k in MEM_KEYS})
            rows.append(row)
            case = f"memory, {n} workers"
            for key, metric in (("primary_rss", "primary RSS MB"), ("primary_uss", "primary USS MB"),
                                ("worker_rss", "worker RSS MB"), ("worker_uss", "worker USS MB"),
                                ("cluster_pss", "cluster PSS MB")):
                records.append(record("scale", case, name, metric, row[key], "MB", False))
    print_table(rows, ["subject", "workers", *MEM_KEYS], ratios=[])
    if len(counts) > 1:
        lo, hi = min(counts), max(counts)
        print()
        for name, source in msubjects.items():
            src = "prefork serve" if name == "prefork serve" else source
            a, b = med(lo, src, "primary_rss"), med(hi, src, "primary_rss")
            c, d = med(lo, src, "cluster_pss"), med(hi, src, "cluster_pss")
            if None not in (a, b, c, d):
                print(f"{name:15s} per added worker ({lo}->{hi}): primary RSS {(b - a) / (hi - lo):+.3f} MB, "  # type: ignore[operator]
                      f"cluster PSS {(d - c) / (hi - lo):+.2f} MB")  # type: ignore[operator]

    print()
    for name in ("prefork library", "prefork serve"):
        vals = [v for n in counts if (v := med(n, msubjects[name] if name != "prefork serve" else name,
                                                "primary_rss")) is not None]
        if vals:
            ok = max(vals) <= TARGET_PRIMARY_RSS_MB
            print(f"{'PASS' if ok else 'FAIL'} primary at most {TARGET_PRIMARY_RSS_MB:g} MB RSS, {name}: "
                  f"max {max(vals):.1f} MB over workers {args.workers}")
    print(f"\nwall time {time.monotonic() - started:.0f} s")
    emit_records(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
