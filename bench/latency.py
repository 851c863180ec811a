"""Latency at a fixed offered rate below saturation, prefork against its peers, hello world (#13).

    .venv/bin/python bench/latency.py [--seconds 5] [--rounds 3] [--fraction 0.5] [--only a,b]
    .venv/bin/python bench/latency.py --validate prefork-asgi     # checks the method itself

Every server of bench/serve.py's table (2 workers each) first gets its maximum keep-alive rate with
plain wrk (-t2 -c64). In each kind group (ASGI with Node's cluster; WSGI) the fixed rate is
--fraction of the best peer's maximum (median of the rounds); then every server of the group is
driven at that same rate, open loop, by bench/openloop.py (wrk2's method: requests fall due on a
fixed schedule, and one sent late counts from its intended send time, so a stall is not hidden:
coordinated omission corrected; --client lua: bench/openloop.lua, the same in a wrk Lua script).
Shown: p50, p99, p99.9, achieved rate, errors; rounds are interleaved and medians shown, as in bench/serve.py.

Target: prefork's p99 at the fixed rate at most the lowest peer p99 (ASGI and WSGI); targets()
gives the verdicts from bench/all.py's summary.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
    wait_http,
)
from serve import ROOT, WORKERS, available, servers  # noqa: E402

BENCH = "latency"
SCRIPT = Path(__file__).resolve().parent / "openloop.lua"
GROUPS = {
    "asgi": ["prefork-asgi", "uvicorn", "gunicorn-uvicorn", "granian-asgi", "node-cluster"],
    "wsgi": ["prefork-wsgi", "gunicorn-gthread", "granian-wsgi"],
}
MAX_CONNECTIONS = 64  # plain wrk -t2 -c64 for the maximum, as bench/serve.py


def kind_of(name: str) -> str:
    return next(kind for kind, names in GROUPS.items() if name in names)


def fixed_case(kind: str, fraction: float) -> str:
    return f"hello {kind}, fixed rate {fraction * 100:g}% of best peer max"


# -- load ------------------------------------------------------------------------------------------


def _script_argv(
    url: str, seconds: float, connections: int, threads: int, script_args: list[str]
) -> list[str]:
    return [
        ensure_wrk(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout=5s",
        "-s", str(SCRIPT), url, "--", *script_args,
    ]  # fmt: skip


def _parse(out: str) -> dict[str, Any]:
    for line in reversed(out.splitlines()):
        if line.startswith("openloop "):
            res: dict[str, Any] = json.loads(line[len("openloop ") :])
            return res
    raise RuntimeError(f"no openloop line in wrk's output:\n{out}")


def _run(argv: list[str], seconds: float, during: Any = None) -> dict[str, Any]:
    """Run wrk; `during(seconds)` (if given) runs in this thread while wrk runs."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if during is not None:
            during(seconds)
        out, err = proc.communicate(timeout=seconds + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.strip() or out.strip()}")
    return _parse(out)


def open_loop(
    url: str,
    rate: float,
    seconds: float,
    connections: int,
    during: Any = None,
    client: str = "python",
    procs: int = 2,
) -> dict[str, Any]:
    """`rate` req/s in total, open loop: bench/openloop.py (default), or bench/openloop.lua (one connection
    per wrk thread, the script says why; it cost about 3x the CPU per request here and could not hold
    half a fast peer's maximum on this 2-CPU machine)."""
    if client == "lua":
        argv = _script_argv(url, seconds, connections, connections, [f"{rate:.3f}", str(connections)])
    else:
        argv = [sys.executable, str(SCRIPT.with_suffix(".py")), url, "--rate", f"{rate:.3f}", "--seconds",
                f"{seconds:g}", "--connections", str(connections), "--procs", str(procs)]  # fmt: skip
    return _run(argv, seconds, during)


def closed_loop(
    url: str, seconds: float, connections: int = MAX_CONNECTIONS, during: Any = None
) -> dict[str, Any]:
    """Plain wrk -t2 (closed loop), with the script's done() only, for its p99.9."""
    return _run(_script_argv(url, seconds, connections, 2, ["closed"]), seconds, during)


# -- servers ---------------------------------------------------------------------------------------


@contextmanager
def running(name: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start one server of bench/serve.py's table on a free port, warmed up; stop it after."""
    tmp = tempfile.mkdtemp(prefix="prefork-latency-")
    port = free_port()
    spec = servers(port, tmp)[name]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFORK_")}
    env.update(spec.get("env", {}))
    env["PYTHONPATH"] = str(ROOT)
    proc = start_process(spec["argv"], env=env, ready_line=None, cwd=str(ROOT), stderr=None)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_http(url, proc=proc)
        run_wrk(url, 1, MAX_CONNECTIONS, 2, latency=False)  # warm-up
        yield proc, url
    finally:
        stop_process(proc, timeout=10.0)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the server's workers, and a template if any), from /proc."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def pause_workers(proc: subprocess.Popen[bytes], at: float, pause_s: float) -> None:
    """After `at` seconds, SIGSTOP the server's workers (pids this bench started) for `pause_s`."""
    time.sleep(at)
    pids = descendants(proc.pid)
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(pause_s)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


# -- the bench -------------------------------------------------------------------------------------


def ms(res: dict[str, Any], key: str) -> float:
    return float(res["latency_us"][key]) / 1000.0


def lag(res: dict[str, Any]) -> float:
    return float(res["send_late_us"]["p99"]) / 1000.0


def measure(
    names: list[str], args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, list[dict[str, Any]]]]:
    maxima: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(args.rounds):
        for name in names:
            try:
                with running(name) as (_, url):
                    rps = run_wrk(url, args.max_seconds, MAX_CONNECTIONS, 2, latency=False)["rps"]
            except Exception as exc:
                print(f"round {rnd + 1}: {name} failed: {exc}", file=sys.stderr)
                continue
            maxima[name].append(rps)
            print(f"round {rnd + 1}/{args.rounds} {name:17s} max {rps:9.0f} req/s", flush=True)
    rates: dict[str, float] = {}
    for kind, group in GROUPS.items():
        members = [n for n in group if maxima.get(n)]
        if not members:
            continue
        peers = [n for n in members if not n.startswith("prefork")] or members  # --only prefork-x alone
        best = max(peers, key=lambda n: median(maxima[n]))
        rates[kind] = args.fraction * median(maxima[best])
        print(f"{kind}: fixed rate {rates[kind]:.0f} req/s = {args.fraction:g} x {best}'s max", flush=True)
    fixed: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rnd in range(args.rounds):
        for name in names:
            rate = rates.get(kind_of(name))
            if rate is None:
                continue
            try:
                with running(name) as (_, url):
                    res = open_loop(
                        url, rate, args.seconds, args.connections, client=args.client, procs=args.procs
                    )
            except Exception as exc:
                print(f"round {rnd + 1}: {name} failed: {exc}", file=sys.stderr)
                continue
            fixed[name].append(res)
            print(
                f"round {rnd + 1}/{args.rounds} {name:17s} at {rate:6.0f} req/s: got {res['rate']:7.0f}, "
                f"p50 {ms(res, 'p50'):6.2f} p99 {ms(res, 'p99'):6.2f} p99.9 {ms(res, 'p999'):6.2f} ms, "
                f"send lag p99 {res['send_late_us']['p99'] / 1000:5.2f} ms, errors {res['errors']:.0f}",
                flush=True,
            )
    return maxima, rates, fixed


def records(
    maxima: dict[str, list[float]],
    rates: dict[str, float],
    fixed: dict[str, list[dict[str, Any]]],
    fraction: float,
) -> list[dict[str, Any]]:
    out = []
    for name, runs in maxima.items():
        if runs:
            case = f"hello {kind_of(name)}, max keep-alive rate (wrk -t2 -c{MAX_CONNECTIONS})"
            out.append(record(BENCH, case, name.replace("-", " "), "req/s", median(runs), "req/s"))
    for name, runs in fixed.items():
        if not runs:
            continue
        case, subject = fixed_case(kind_of(name), fraction), name.replace("-", " ")
        out += [  # p99 first: bench/all.py's ratios are on a case's first metric
            record(BENCH, case, subject, "p99 ms", median([ms(r, "p99") for r in runs]), "ms", higher=False),
            record(BENCH, case, subject, "p50 ms", median([ms(r, "p50") for r in runs]), "ms", higher=False),
            record(
                BENCH, case, subject, "p99.9 ms", median([ms(r, "p999") for r in runs]), "ms", higher=False
            ),
            record(BENCH, case, subject, "achieved req/s", median([r["rate"] for r in runs]), "req/s"),
            record(BENCH, case, subject, "offered req/s", rates[kind_of(name)], "req/s"),
            record(BENCH, case, subject, "errors", sum(r["errors"] for r in runs), "", higher=False),
            # how far sends fell behind the schedule: every connection busy (the server saturated) or
            # the client short of CPU; near p99 it says the figures measure more than the server
            record(
                BENCH, case, subject, "send lag p99 ms", median([lag(r) for r in runs]), "ms", higher=False
            ),
        ]
    return out


def targets(summary: Mapping[tuple[str, str, str, str], Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(PASS/MISS/n/a, label, figure) from bench/all.py's summary ((bench, case, subject, metric) ->
    {"median": ...}): prefork's p99 at the fixed rate at most the lowest peer p99, ASGI and WSGI."""
    out = []
    for kind in GROUPS:
        label = f"{kind.upper()} p99 at a fixed rate below saturation at most the lowest peer p99"
        p99 = {
            (case, subject): s["median"]
            for (bench, case, subject, metric), s in summary.items()
            if bench == BENCH and case.startswith(f"hello {kind}, fixed rate") and metric == "p99 ms"
        }
        ours = {case: v for (case, subject), v in p99.items() if subject == f"prefork {kind}"}
        if len(ours) != 1:
            out.append(("n/a", label, "not measured"))
            continue
        case, v = next(iter(ours.items()))
        peers = {
            subject: w for (c, subject), w in p99.items() if c == case and not subject.startswith("prefork")
        }
        if not peers:
            out.append(("n/a", label, "no peer measured"))
            continue
        best = min(peers, key=lambda s: peers[s])
        figure = f"{v:.2f} ms vs {best} {peers[best]:.2f} ms = {v / peers[best]:.2f}x (target <= 1)"
        out.append(("PASS" if v <= peers[best] else "MISS", label, figure))
    return out


def validate(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The method itself on one server: the rate held, and a 100 ms stall seen by the open loop."""
    rows: list[dict[str, Any]] = []
    with running(name) as (proc, url):
        top = run_wrk(url, args.max_seconds, MAX_CONNECTIONS, 2, latency=False)["rps"]
        rate = args.fraction * top
        print(f"{name}: max {top:.0f} req/s, open loop at {rate:.0f} req/s", flush=True)
        half = args.seconds / 2

        def pause(_: float) -> None:
            pause_workers(proc, half, args.pause_ms / 1000)

        for label, res in (
            (
                "open loop",
                open_loop(url, rate, args.seconds, args.connections, client=args.client, procs=args.procs),
            ),
            (
                "open loop, paused",
                open_loop(url, rate, args.seconds, args.connections, pause, args.client, args.procs),
            ),
            ("plain wrk -t2 -c64", closed_loop(url, args.seconds)),
            ("plain wrk -t2 -c64, paused", closed_loop(url, args.seconds, during=pause)),
        ):
            views = [("", res["latency_us"])]
            if res["mode"] == "open":
                views.append((" (service time, uncorrected)", res["service_us"]))
            for suffix, lat in views:
                rows.append({
                    "run": label + suffix,
                    "target req/s": rate if res["mode"] == "open" else None,
                    "achieved req/s": res["rate"],
                    "off %": 100 * (res["rate"] / rate - 1) if res["mode"] == "open" else None,
                    "p50 ms": lat["p50"] / 1000, "p99 ms": lat["p99"] / 1000,
                    "p99.9 ms": lat["p999"] / 1000, "max ms": lat["max"] / 1000,
                    "errors": int(res["errors"]),
                })  # fmt: skip
    print()
    print(
        f"{name}, {WORKERS} workers; paused runs: workers SIGSTOPped {args.pause_ms:g} ms at {half:g} s of "
        f"{args.seconds:g} s"
    )
    print_table(rows, list(rows[0]), ratios=[])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="open-loop run per server and round")
    parser.add_argument("--max-seconds", type=float, default=3.0, help="plain wrk run for the maximum")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median shown)")
    parser.add_argument("--fraction", type=float, default=0.5, help="fixed rate / best peer's maximum")
    parser.add_argument("--connections", type=int, default=64, help="open-loop connections, in total")
    parser.add_argument("--client", choices=["python", "lua"], default="python", help="open-loop client")
    parser.add_argument("--procs", type=int, default=2, help="open-loop client processes (python client)")
    parser.add_argument("--only", default="", help="comma-separated server names")
    parser.add_argument("--validate", metavar="SERVER", help="check the method on one server instead")
    parser.add_argument("--pause-ms", type=float, default=100.0, help="--validate: SIGSTOP length")
    args = parser.parse_args()

    if args.validate:
        rows = validate(args.validate, args)
        emit_records([], validation=rows)
        return 0

    table = servers(0, tempfile.gettempdir())
    names = [n for group in GROUPS.values() for n in group]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    skipped = {n: why for n in names if (why := available(table[n]))}
    names = [n for n in names if n not in skipped]
    maxima, rates, fixed = measure(names, args)

    print()
    print(
        f"hello world, {WORKERS} workers each; open loop ({args.client} client), {args.connections} conns, "
        f"{args.seconds:g} s; median of {args.rounds} rounds"
    )
    rows = []
    for name in names:
        runs = fixed[name]
        if not runs:
            continue
        rows.append({
            "server": name, "max req/s": median(maxima[name]) if maxima[name] else None,
            "offered": rates[kind_of(name)], "achieved": median([r["rate"] for r in runs]),
            "p50 ms": median([ms(r, "p50") for r in runs]), "p99 ms": median([ms(r, "p99") for r in runs]),
            "p99.9 ms": median([ms(r, "p999") for r in runs]), "errors": sum(int(r["errors"]) for r in runs),
            "send lag p99 ms": median([lag(r) for r in runs]),
        })  # fmt: skip
    if rows:
        print_table(rows, list(rows[0]), ratios=[])
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    recs = records(maxima, rates, fixed, args.fraction)
    summary = {(r["bench"], r["case"], r["subject"], r["metric"]): {"median": r["value"]} for r in recs}
    print()
    for status, label, figure in targets(summary):
        print(f"{status} {label}: {figure}")
    emit_records(recs, skipped=skipped, rates=rates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
