"""Every benchmark of bench/, prefork and its peers side by side, in interleaved rounds.

    scripts/bench [--rounds 3] [--quick] [--only NAME,...]

NAME: ipc, policies, serve, realistic, latency, lifecycle, scale, admin, deploys.

Each round runs every bench once (each bench alternates prefork and its peers inside the round), so
the noise of this shared machine falls on all of them alike; the table shows the median of the rounds
with min-max and prefork's ratio to each peer. Writes bench/results/<date>.json (machine, versions,
every record of every round), bench/results/latest.md (the table) and latest.png (the chart), and puts
the table between the bench markers of README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import targets_serve
from latency import targets as latency_targets
from realistic import targets as realistic_targets

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PYTHON = sys.executable

# bench -> (arguments for one round, arguments for one quick round, time limit of one round in s)
BENCHES: dict[str, tuple[list[str], list[str], float]] = {
    "ipc": (["--runs", "1", "--seconds", "2"], ["--runs", "1", "--seconds", "0.5"], 600),  # 3 placements
    "policies": (["--runs", "1", "--seconds", "3"], ["--runs", "1", "--seconds", "1"], 400),
    # 9 servers x 3 shapes, 5 wrk runs each: 152 s a round, 62-72 s quick (2 cores, measured)
    "serve": (["--rounds", "1", "--seconds", "3"], ["--rounds", "1", "--seconds", "1"], 400),
    "realistic": (["--rounds", "1", "--seconds", "4"], ["--rounds", "1", "--seconds", "1"], 400),  # ~150 s
    # a quarter of the best peer's maximum, not half: the open-loop client needs about a CPU at half,
    # which saturates every server on 2 CPUs (bench/RESULTS.md); ~100 s a round
    "latency": (["--rounds", "1", "--seconds", "5", "--fraction", "0.25"],
                ["--rounds", "1", "--seconds", "2", "--max-seconds", "1", "--fraction", "0.25"], 400),
    "lifecycle": (
        ["--kills", "5", "--reloads", "3", "--seconds", "6"],
        ["--kills", "2", "--reloads", "1", "--seconds", "3"],
        400,
    ),
    "scale": (
        ["--rounds", "1", "--seconds", "3"],
        ["--rounds", "1", "--seconds", "1", "--workers", "1,2,4"],
        400,
    ),
    "admin": (["--seconds", "8"], ["--seconds", "4", "--requests", "150"], 120),
    "deploys": (["--kills", "8", "--reloads", "5"], ["--kills", "3", "--reloads", "2"], 400),
}

Key = tuple[str, str, str, str]  # bench, case, subject, metric


# -- running --------------------------------------------------------------------------------------


def run_bench(name: str, args: list[str], limit: float, log: Path) -> list[dict[str, Any]]:
    """One bench, one round: its output goes to `log`, its records come back (none if it failed)."""
    argv = [PYTHON, str(HERE / f"{name}.py"), *args]
    with log.open("w") as out:
        try:
            proc = subprocess.run(
                argv, stdout=subprocess.PIPE, stderr=out, text=True, timeout=limit, cwd=ROOT
            )
        except subprocess.TimeoutExpired:
            out.write(f"\n(stopped after {limit:g} s)\n")
            return []
        out.write(proc.stdout)
    lines = proc.stdout.strip().splitlines()
    try:
        return list(json.loads(lines[-1])["records"])
    except (IndexError, ValueError, KeyError, TypeError):
        return []


def run_rounds(names: Sequence[str], rounds: int, quick: bool, stamp: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for rnd in range(1, rounds + 1):
        for name in names:
            full, short, limit = BENCHES[name]
            start = time.monotonic()
            print(f"[round {rnd}/{rounds}] {name} ...", end="", flush=True)
            log = RESULTS / "logs" / f"{stamp}-{name}-{rnd}.log"
            got = run_bench(name, short if quick else full, limit, log)
            for r in got:
                r["round"] = rnd
            records += got
            status = f"{len(got)} figures" if got else f"FAILED (see {log.relative_to(ROOT)})"
            print(f" {time.monotonic() - start:.0f} s, {status}", flush=True)
    return records


# -- summarising ----------------------------------------------------------------------------------


def summarize(records: Iterable[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """(bench, case, subject, metric) -> median, min, max over the rounds, unit and direction."""
    values: dict[Key, list[float]] = defaultdict(list)
    meta: dict[Key, dict[str, Any]] = {}
    for r in records:
        key = (r["bench"], r["case"], r["subject"], r["metric"])
        meta[key] = {"unit": r.get("unit", ""), "higher": r.get("higher", True)}
        if isinstance(r.get("value"), (int, float)):
            values[key].append(float(r["value"]))
    out = {}
    for key, m in meta.items():
        xs = sorted(values.get(key, []))
        if xs:
            mid = len(xs) // 2
            med = xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2
            out[key] = {**m, "median": med, "min": xs[0], "max": xs[-1], "n": len(xs)}
    return out


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def cell(s: dict[str, Any]) -> str:
    if s["n"] > 1 and s["min"] != s["max"]:
        return f"{fmt(s['median'])} <sub>{fmt(s['min'])}–{fmt(s['max'])}</sub>"
    return fmt(s["median"])


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def markdown(summary: dict[Key, dict[str, Any]]) -> str:
    """Per bench and case: a row per subject, a column per metric (median, min–max below), then
    each prefork subject's ratio to each peer on the case's first metric."""
    cases: dict[tuple[str, str], dict[str, dict[str, dict[str, Any]]]] = defaultdict(dict)
    metrics: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (bench, case, subject, metric), s in summary.items():
        cases[(bench, case)].setdefault(subject, {})[metric] = s
        if metric not in metrics[(bench, case)]:
            metrics[(bench, case)].append(metric)
    lines: list[str] = []
    bench_seen = None
    for (bench, case), subjects in cases.items():
        if bench != bench_seen:
            lines += [f"### {bench}", ""]
            bench_seen = bench
        cols = metrics[(bench, case)]
        lines += [
            f"**{case}**",
            "",
            "| subject | " + " | ".join(cols) + " | prefork / this |",
            "|---|" + "---|" * (len(cols) + 1),
        ]
        first = cols[0]
        ours = {n: m[first]["median"] for n, m in subjects.items() if n.startswith("prefork") and first in m}
        for name, by_metric in subjects.items():
            row = [cell(by_metric[c]) if c in by_metric else "-" for c in cols]
            theirs = by_metric.get(first, {}).get("median")
            vs = (
                ""
                if name.startswith("prefork") or theirs is None
                else ", ".join(
                    f"{ratio(v, theirs)} ({n})" if len(ours) > 1 else ratio(v, theirs)
                    for n, v in ours.items()
                )
            )
            lines.append(f"| {name} | " + " | ".join(row) + f" | {vs} |")
        direction = "higher" if next(iter(subjects.values()))[first]["higher"] else "lower"
        lines += ["", f"<sub>ratio on {first}, {direction} is better</sub>", ""]
    return "\n".join(lines)


# -- targets --------------------------------------------------------------------------------------


def _get(
    summary: dict[Key, dict[str, Any]], bench: str, case: str, subject: str, metric: str
) -> float | None:
    s = summary.get((bench, case, subject, metric))
    return None if s is None else s["median"]


TARGETS: list[tuple[str, tuple[str, str, str, str], tuple[str, str, str, str] | None, str, float]] = [
    # label, numerator, denominator (None: an absolute value), test, bound
    (
        "RR hand-off at least 1.5x Node's RR primary",
        ("policies", "hello, close", "prefork rr", "req/s"),
        ("policies", "hello, close", "node rr", "req/s"),
        ">=",
        1.5,
    ),
    (
        "RR within 10% of prefork's own SCHED_NONE",
        ("policies", "hello, close", "prefork rr", "req/s"),
        ("policies", "hello, close", "prefork none", "req/s"),
        ">=",
        0.9,
    ),
    (
        "ASGI keep-alive at least uvicorn's",
        ("serve", "hello, keep-alive", "prefork asgi", "req/s"),
        ("serve", "hello, keep-alive", "uvicorn", "req/s"),
        ">=",
        1.0,
    ),
    (
        "ASGI keep-alive ahead of Node's cluster",
        ("serve", "hello, keep-alive", "prefork asgi", "req/s"),
        ("serve", "hello, keep-alive", "node cluster", "req/s"),
        ">",
        1.0,
    ),
    (
        "WSGI at least 2x gunicorn gthread (keep-alive)",
        ("serve", "hello, keep-alive", "prefork wsgi", "req/s"),
        ("serve", "hello, keep-alive", "gunicorn gthread", "req/s"),
        ">=",
        2.0,
    ),
    (  # {placement}: bench/ipc.py measures it in each CPU placement; the worst one is shown (#15)
        "channel round trips, small JSON, at least 1.5x Node in every CPU placement",
        ("ipc", "round trips, 64 B, {placement}", "prefork", "msg/s"),
        ("ipc", "round trips, 64 B, {placement}", "node", "msg/s"),
        ">=",
        1.5,
    ),
    (
        "a 16 MiB message faster than Node's (round trip), in every CPU placement",
        ("ipc", "round trips, 16 MiB, {placement}", "prefork", "msg/s"),
        ("ipc", "round trips, 16 MiB, {placement}", "node", "msg/s"),
        ">",
        1.0,
    ),
    (
        "streamed small messages at least Node's, in every CPU placement",
        ("ipc", "streamed, 64 B, {placement}", "prefork", "msg/s"),
        ("ipc", "streamed, 64 B, {placement}", "node", "msg/s"),
        ">=",
        1.0,
    ),
    (
        "respawn to ready at most a quarter of Node's (library, forked workers)",
        ("lifecycle", "respawn, kill to listening", "prefork, forked (preload)", "ms"),
        ("lifecycle", "respawn, kill to listening", "node", "ms"),
        "<=",
        0.25,
    ),
    (  # bench/deploys.py, issue 12: a worker SIGKILLed to the first request served again, 1 worker
        "serve --no-preload: respawn to a served request at most a quarter of Node's",
        ("deploys", "respawn, kill to a served request, 1 worker", "prefork serve --no-preload", "ms"),
        ("deploys", "respawn, kill to a served request, 1 worker", "node cluster", "ms"),
        "<=",
        0.25,
    ),
    (
        "serve (default: --preload): respawn to a served request at most a quarter of Node's",
        ("deploys", "respawn, kill to a served request, 1 worker", "prefork serve --preload", "ms"),
        ("deploys", "respawn, kill to a served request, 1 worker", "node cluster", "ms"),
        "<=",
        0.25,
    ),
    (
        "serve --preload: per-worker USS at least 30% below --no-preload (Django, 4 workers)",
        ("deploys", "memory, Django WSGI, 4 workers", "prefork serve --preload", "worker USS MB"),
        ("deploys", "memory, Django WSGI, 4 workers", "prefork serve --no-preload", "worker USS MB"),
        "<=",
        0.7,
    ),
    (  # Node's master.js prints "reloaded" once its old workers exited: prefork's "replaced"
        "serve --no-preload: reload (SIGHUP, 2 workers) no slower than Node's master.js",
        ("deploys", "reload, 2 workers, idle", "prefork serve --no-preload", "replaced ms"),
        ("deploys", "reload, 2 workers, idle", "node cluster (kill)", "replaced ms"),
        "<=",
        1.0,
    ),
    (
        "serve (default: --preload): reload (SIGHUP, 2 workers) no slower than Node's master.js",
        ("deploys", "reload, 2 workers, idle", "prefork serve --preload", "replaced ms"),
        ("deploys", "reload, 2 workers, idle", "node cluster (kill)", "replaced ms"),
        "<=",
        1.0,
    ),
    (
        "least_conn p99 below rr's under uneven work",
        ("policies", "uneven work, close", "prefork least_conn", "p99 ms"),
        ("policies", "uneven work, close", "prefork rr", "p99 ms"),
        "<",
        1.0,
    ),
    (  # issue 13: no worse than the best of these two (so: than each)
        "least_conn p99 under uneven work at most Node's rr",
        ("policies", "uneven work, close", "prefork least_conn", "p99 ms"),
        ("policies", "uneven work, close", "node rr", "p99 ms"),
        "<=",
        1.0,
    ),
    (
        "least_conn p99 under uneven work at most prefork's none (a shared socket)",
        ("policies", "uneven work, close", "prefork least_conn", "p99 ms"),
        ("policies", "uneven work, close", "prefork none", "p99 ms"),
        "<=",
        1.0,
    ),
    (
        "primary at most 25 MB RSS (prefork serve, 2 workers)",
        ("scale", "memory, 2 workers", "prefork serve", "primary RSS MB"),
        None,
        "<=",
        25.0,
    ),
    (
        "admin /readyz p99 under 10 ms, workers saturated by wrk",
        ("admin", "admin /readyz, workers saturated by wrk", "prefork", "p99 ms"),
        None,
        "<",
        10.0,
    ),
    (
        "primary at most 25 MB RSS with metrics on (serve, 2 workers, after scrapes)",
        ("admin", "primary RSS, 2 workers, metrics on", "prefork", "MB"),
        None,
        "<=",
        25.0,
    ),
    (
        "primary at most 25 MB RSS (library, 2 workers)",
        ("scale", "memory, 2 workers", "prefork library", "primary RSS MB"),
        None,
        "<=",
        25.0,
    ),
]


IPC_PLACEMENTS = ("one CPU", "two CPUs", "unpinned")  # the case suffixes of bench/ipc.py


def _value(
    summary: dict[Key, dict[str, Any]], num: Key, den: Key | None, test: str
) -> tuple[float, str] | None:
    """num/den, or for a case with {placement} the worst over IPC_PLACEMENTS (and which one)."""
    worst: tuple[float, str] | None = None
    for place in IPC_PLACEMENTS if "{placement}" in num[1] else ("",):
        a = _get(summary, num[0], num[1].format(placement=place), *num[2:])
        b = 1.0 if den is None else _get(summary, den[0], den[1].format(placement=place), *den[2:])
        if a is None or not b:
            return None  # a placement not measured: no verdict
        value = a / b
        if worst is None or (value < worst[0] if test.startswith(">") else value > worst[0]):
            worst = (value, place)
    return worst


def check_targets(summary: dict[Key, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(PASS/MISS/n/a, label, figure) for every target the issues set."""
    tests = {">=": float.__ge__, ">": float.__gt__, "<=": float.__le__, "<": float.__lt__}
    out = []
    for label, num, den, test, bound in TARGETS:
        got = _value(summary, num, den, test)
        if got is None:
            out.append(("n/a", label, "not measured"))
            continue
        value, place = got
        figure = f"{value:.2f}x" if den is not None else f"{value:.1f}"
        if place:
            figure += f", worst: {place}"
        out.append(
            ("PASS" if tests[test](value, bound) else "MISS", label, f"{figure} (target {test} {bound:g})")
        )
    # bench/serve.py's per-shape targets (#13) and the CPU breakdown that explains a miss
    out += targets_serve.check(lambda case, subject, m: _get(summary, "serve", case, subject, m))
    out += realistic_targets(summary)  # bench/realistic.py: FastAPI and Flask apps (#13)
    return out + latency_targets(summary)  # bench/latency.py: p99 at a fixed offered rate (#13)


def targets_markdown(results: list[tuple[str, str, str]]) -> str:
    lines = ["| target | measured | |", "|---|---|---|"]
    lines += [f"| {label} | {figure} | {status} |" for status, label, figure in results]
    return "\n".join(lines)


# -- the machine ----------------------------------------------------------------------------------


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def _pip_versions(python: Path, names: Sequence[str]) -> dict[str, str]:
    if not python.exists():
        return {}
    code = (
        "import importlib.metadata as m, json, sys\nout = {}\nfor n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))"
    )
    try:
        return json.loads(
            subprocess.run(
                [str(python), "-c", code, *names], capture_output=True, text=True, timeout=30
            ).stdout
        )
    except (ValueError, OSError, subprocess.TimeoutExpired):
        return {}


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)  # type: ignore[union-attr]
    except (OSError, AttributeError):
        pass
    versions = {
        "python": platform.python_version(),
        "node": _version(["node", "--version"]),
        "wrk": _version([shutil.which("wrk") or "wrk", "--version"]).split(" [")[0].removeprefix("wrk "),
    }
    versions |= _pip_versions(
        ROOT / ".venv" / "bin" / "python", ["prefork", "uvicorn", "uvloop", "httptools"]
    )
    peers = _pip_versions(
        ROOT / ".venv-peers" / "bin" / "python", ["uvicorn", "gunicorn", "granian", "uvicorn-worker"]
    )
    versions |= {f"{k} (peer)": v for k, v in peers.items()}
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "versions": versions}


def machine_line(m: dict[str, Any]) -> str:
    v = ", ".join(f"{k} {val}" for k, val in m["versions"].items())
    return f"{m['cpus']} cores ({m['cpu']}), Linux {m['kernel']}; {v}"


# -- output ---------------------------------------------------------------------------------------


def write_readme(block: str) -> bool:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{block}\n{end}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        usage="scripts/bench [--rounds N] [--quick] [--only NAMES [--keep FILE]] [--no-readme]",
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (at least 3 for the README)")
    ap.add_argument("--quick", action="store_true", help="short measurements, to check the set-up")
    ap.add_argument("--only", default="", help="comma-separated benches: " + ",".join(BENCHES))
    ap.add_argument("--no-readme", action="store_true", help="do not update README.md")
    ap.add_argument(
        "--keep",
        metavar="FILE",
        help="with --only: the other benches' figures from this "
        "earlier bench/results/*.json (a bench re-measured after a change)",
    )
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown or args.rounds < 1:
        ap.error(f"unknown bench {', '.join(unknown)}" if unknown else "--rounds must be at least 1")
    kept: list[dict[str, Any]] = []
    if args.keep:
        try:
            earlier = json.loads(Path(args.keep).read_text())
        except (OSError, ValueError) as exc:
            ap.error(f"--keep {args.keep}: {exc}")
        if earlier.get("rounds") != args.rounds or earlier.get("quick") != args.quick:
            ap.error(f"--keep {args.keep}: measured with other --rounds/--quick")
        kept = [r for r in earlier["records"] if r["bench"] not in names]
        names_kept = sorted({r["bench"] for r in kept})
        print(f"kept from {args.keep}: {', '.join(names_kept)}", flush=True)
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    stamp = now.strftime("%Y-%m-%dT%H%M")
    info = machine()
    print(f"machine: {machine_line(info)}", flush=True)
    records = run_rounds(names, args.rounds, args.quick, stamp) + kept
    summary = summarize(records)
    targets = check_targets(summary)
    (RESULTS / f"{stamp}.json").write_text(
        json.dumps(
            {
                "date": now.isoformat(timespec="seconds"),
                "machine": info,
                "rounds": args.rounds,
                "quick": args.quick,
                "benches": names,
                "kept": args.keep,
                "records": records,
                "summary": [
                    {"bench": k[0], "case": k[1], "subject": k[2], "metric": k[3], **v}
                    for k, v in summary.items()
                ],
                "targets": [{"status": s, "target": label, "measured": f} for s, label, f in targets],
            },
            indent=1,
        )
    )
    chart = RESULTS / "latest.png"
    drew = draw_chart(summary, info, now, chart)
    head = (
        f"Measured {now:%Y-%m-%d %H:%M} UTC by `scripts/bench --rounds {args.rounds}"
        f"{' --quick' if args.quick else ''}` on {machine_line(info)}. Medians of {args.rounds} interleaved"
        f" rounds, min–max below each."
        + (f" Re-measured: {', '.join(names)}; the rest from {Path(args.keep).name}." if args.keep else "")
    )
    table = "\n\n".join([head, targets_markdown(targets), markdown(summary)])
    (RESULTS / "latest.md").write_text(table + "\n")
    print("\n" + table)
    if not args.quick and not args.no_readme and (args.only == "" or args.keep):
        block = "\n\n".join(
            [
                head,
                targets_markdown(targets),
                "![benchmarks](bench/results/latest.png)" if drew else "",
                "Every table: [bench/results/latest.md](bench/results/latest.md).",
            ]
        )
        write_readme(block)
    print(f"\nwrote bench/results/{stamp}.json, latest.md" + (", latest.png" if drew else ""))
    return 0


def draw_chart(
    summary: dict[Key, dict[str, Any]], info: dict[str, Any], now: datetime.datetime, path: Path
) -> bool:
    try:
        from chart import draw
    except ImportError as exc:
        print(f"no chart: {exc} (scripts/bench installs matplotlib)", file=sys.stderr)
        return False
    draw(summary, f"prefork benchmarks, {now:%Y-%m-%d}: {machine_line(info)}", path)
    return True


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
