"""`prefork serve` against its peers, hello world, 2 workers each, with wrk on 127.0.0.1, in one run.

    .venv/bin/pip install -e '.[serve,bench]'     # gunicorn, uvicorn-worker, granian (peers only)
    .venv/bin/python bench/serve.py [--seconds 4] [--rounds 3] [--shapes t1c64,t2c32,many]
                                    [--only prefork-asgi,uvicorn]

Every server is measured in three load shapes (bench/targets_serve.py): `t1c64` (wrk -t1 -c64) and
`t2c32` (wrk -t2 -c32), each with keep-alive and with `Connection: close` (a new connection per
request, where accept hand-off costs show), and `many` (wrk -t2 -c2000, keep-alive only). For
`many` the bench raises its RLIMIT_NOFILE, which wrk and the servers inherit, and reports each
server's fd limit, the sockets it holds mid-run (one that stopped accepting holds fewer than 2000:
the servers here mostly say nothing about EMFILE), "Too many open files" on its stderr, and wrk's
errors and timeouts. prefork-asgi-rr is prefork's ASGI with --policy rr (the primary hands out the
connections).

For each measurement: requests per second, p50 and p99 latency, wrk's errors and timeouts, and where
the CPU went (bench/_cost.py): utime and stime of the server's main process and of all its
descendants (workers, templates) from /proc just before and after the wrk run, as CPU microseconds
per request, primary and workers, user and kernel. A figure is the median of the rounds on its own,
so the four parts need not add up to the total exactly.

Records: case "hello, keep-alive, t1c64", "hello, Connection: close, t1c64", ..., "hello, keep-alive,
many"; the t2c32 shape keeps the names of the runs before shapes ("hello, keep-alive", "hello,
Connection: close": close was wrk -t2 -c32 then too, keep-alive -t2 -c64). The CPU of a measurement
is in the case "<its case>, CPU us/req". Servers are measured in rounds, interleaved, and the median
of the rounds is shown: this machine is shared and noisy, and interleaving spreads the noise over
every server alike. A server takes 5 x --seconds + about 2 s (start, warm-up, stop) for the three
shapes: one round of the 9 servers took 62-72 s with --seconds 1, and 152 s with --seconds 3
(scripts/bench's round), on 2 cores.

The targets of issue #13 are checked at the end, per shape (bench/targets_serve.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cost import cpu_per_request, cpu_sample, nofile_of, open_sockets, raise_nofile  # noqa: E402
from _harness import (  # noqa: E402
    emit_records,
    free_port,
    median,
    print_table,
    record,
    run_wrk,
    start_process,
    stop_process,
    wait_http,
)
from _procs import descendants  # noqa: E402
from targets_serve import (  # noqa: E402
    CLOSE,
    CPU_PARTS,
    CPU_TOTAL,
    KEEP,
    SHAPES,
    SOCKETS,
    case,
    check,
    cpu_case,
    modes,
    wrk_label,
)

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
PEERS = ROOT / ".venv-peers" / "bin"  # the peers live in their own venv (scripts/bench makes it)
WORKERS = "2"
FD_ERROR = re.compile(r"Too many open files|EMFILE", re.I)


def _peer(name: str) -> Path:
    """A peer's command: from the peers' venv, else from the project's (older set-ups)."""
    return PEERS / name if (PEERS / name).exists() else BIN / name


def servers(port: int, tmp: str) -> dict[str, dict[str, Any]]:
    """name -> argv, env, and what it needs; all serve tests/apps/hello.py on 127.0.0.1:port."""
    bind = f"127.0.0.1:{port}"
    prefork = [
        str(BIN / "prefork"),
        "serve",
        "--workers",
        WORKERS,
        "--bind",
        bind,
        "--log-level",
        "warning",
        "--control",
        os.path.join(tmp, "ctl.sock"),
    ]
    gunicorn = [str(_peer("gunicorn")), "-w", WORKERS, "-b", bind, "--log-level", "warning"]
    granian = [
        str(_peer("granian")),
        "--workers",
        WORKERS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    return {
        "prefork-asgi": {"argv": [*prefork, "tests.apps.hello:asgi"], "kind": "asgi"},
        "prefork-asgi-rr": {"argv": [*prefork, "--policy", "rr", "tests.apps.hello:asgi"], "kind": "asgi"},
        "prefork-wsgi": {"argv": [*prefork, "tests.apps.hello:wsgi"], "kind": "wsgi"},
        "uvicorn": {
            "argv": [
                str(_peer("uvicorn")),
                "--workers",
                WORKERS,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
                "tests.apps.hello:asgi",
            ],
            "kind": "asgi",
        },
        "gunicorn-uvicorn": {
            "argv": [*gunicorn, "-k", "uvicorn_worker.UvicornWorker", "tests.apps.hello:asgi"],
            "kind": "asgi",
            "needs": "uvicorn-worker",
        },
        "gunicorn-gthread": {
            "argv": [*gunicorn, "-k", "gthread", "--threads", "4", "tests.apps.hello:wsgi"],
            "kind": "wsgi",
        },
        "granian-asgi": {
            "argv": [*granian, "--interface", "asgi", "tests.apps.hello:asgi"],
            "kind": "asgi",
        },
        "granian-wsgi": {
            "argv": [*granian, "--interface", "wsgi", "tests.apps.hello:wsgi"],
            "kind": "wsgi",
        },
        "node-cluster": {
            "argv": ["node", str(ROOT / "bench" / "node" / "hello.js")],
            "kind": "node",
            "env": {"PORT": str(port), "WORKERS": WORKERS},
            "needs_cmd": "node",
        },
    }


def available(spec: dict[str, Any]) -> str | None:
    """Why a server cannot run here, or None."""
    program = Path(spec["argv"][0])
    if program.is_absolute() and not program.exists():
        return f"{program.name} not installed (scripts/bench installs the peers into .venv-peers)"
    package = spec.get("needs")
    if package and not any(
        Path(program).parent.parent.glob(f"lib/python*/site-packages/{package.replace('-', '_')}")
    ):
        return f"{package} not installed (scripts/bench installs the peers into .venv-peers)"
    cmd = spec.get("needs_cmd")
    if cmd and shutil.which(cmd) is None:
        return f"{cmd} not found"
    return None


def _wrk_errors(raw: str) -> tuple[int, int]:
    """(connect + read + write errors + non-2xx/3xx answers, timeouts) from wrk's output."""
    errors = timeouts = 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", raw):
        errors, timeouts = sum(int(g) for g in m.groups()[:3]), int(m.group(4))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", raw):
        errors += int(m.group(1))
    return errors, timeouts


# -- one server ------------------------------------------------------------------------------------


def measure(name: str, spec: dict[str, Any], port: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, measure every shape and mode, stop it: {(shape, mode): figures, "nofile": its
    lowest fd limit, "fd_errors": "Too many open files" lines on its stderr}."""
    url = f"http://127.0.0.1:{port}/"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFORK_")}
    env.update(spec.get("env", {}))
    env["PYTHONPATH"] = str(ROOT)
    out: dict[Any, Any] = {}
    with tempfile.TemporaryFile() as log:  # its stderr, searched for fd errors afterwards
        proc = start_process(spec["argv"], env=env, ready_line=None, cwd=str(ROOT), stderr=log)
        try:
            wait_http(url, proc=proc)
            run_wrk(url, 1, 32, 2, latency=False)  # warm-up
            out["nofile"] = nofile_of([proc.pid, *descendants(proc.pid)])
            for shape in args.shapes:
                threads, connections, _ = SHAPES[shape]
                for mode in modes(shape):
                    mid: list[int] = []
                    timer = threading.Timer(args.seconds / 2, lambda into=mid: into.append(
                        open_sockets([proc.pid, *descendants(proc.pid)])))
                    before = cpu_sample(proc.pid)
                    timer.start()
                    res = run_wrk(url, args.seconds, connections, threads, close=mode == CLOSE)
                    after = cpu_sample(proc.pid)
                    timer.join()
                    errors, timeouts = _wrk_errors(res["raw"])
                    out[(shape, mode)] = {
                        "rps": res["rps"], "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"],
                        "errors": errors, "timeouts": timeouts, "sockets": mid[0] if mid else None,
                        **cpu_per_request(proc.pid, before, after, res["requests"] or 0),
                    }
        finally:
            stop_process(proc, timeout=10.0)
            log.seek(0)
            text = log.read().decode(errors="replace")
    out["fd_errors"] = len(FD_ERROR.findall(text))
    if re.search(r"Traceback|error|Too many open files", text, re.I):  # else only start/stop lines
        sys.stderr.write(f"--- {name}'s stderr (last 3000 characters) ---\n{text[-3000:]}\n")
    return out


# -- the run ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="wrk duration per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median shown)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ",".join(SHAPES))
    parser.add_argument("--only", default="", help="comma-separated server names")
    args = parser.parse_args()
    args.shapes = [s for s in SHAPES if s in args.shapes.split(",")]
    if not args.shapes:
        parser.error(f"--shapes: none of {', '.join(SHAPES)}")
    most = max(SHAPES[s][1] for s in args.shapes)
    nofile = raise_nofile(2 * most + 256)  # wrk's sockets, a server's (all in one worker at worst)
    if nofile < most + 64:
        print(f"WARNING: RLIMIT_NOFILE is {nofile} (the hard limit): wrk cannot open {most} connections")

    tmp = tempfile.mkdtemp(prefix="prefork-bench-")
    names = list(servers(0, tmp))
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    skipped = {}
    for name in list(names):
        why = available(servers(0, tmp)[name])
        if why:
            skipped[name] = why
            names.remove(name)
    results: dict[str, list[dict[Any, Any]]] = {n: [] for n in names}
    started = time.monotonic()
    for rnd in range(args.rounds):
        for name in names:
            port = free_port()
            t0 = time.monotonic()
            try:
                res = measure(name, servers(port, tmp)[name], port, args)
            except Exception as exc:
                print(f"round {rnd + 1}: {name} failed: {exc}", file=sys.stderr)
                continue
            results[name].append(res)
            for shape in args.shapes:
                got = [(mode, res[(shape, mode)]) for mode in modes(shape)]
                cells = " | ".join(f"{mode} {r['rps']:8.0f} req/s p99 {r['p99_ms'] or 0:7.2f} ms errors "
                                   f"{r['errors']} timeouts {r['timeouts']} sockets {r['sockets']}"
                                   for mode, r in got)
                print(f"round {rnd + 1}/{args.rounds} {name:17s} {shape:5s} {cells}", flush=True)
                if gone := sum(r["exited"] for _, r in got):
                    print(f"WARNING {name}: {gone} worker(s) exited while measured: their CPU is missing")
            fds = f", server fd errors {res['fd_errors']}" if res["fd_errors"] else ""
            print(f"round {rnd + 1}/{args.rounds} {name:17s} {time.monotonic() - t0:.0f} s, "
                  f"server nofile {res['nofile']}{fds}", flush=True)
            if res["nofile"] is not None and res["nofile"] < most + 64:
                print(f"WARNING {name}: a process's RLIMIT_NOFILE is {res['nofile']}, below {most + 64}")
    elapsed = time.monotonic() - started

    summary = summarize(results, args.shapes)
    print()
    print(f"hello world, {WORKERS} workers each, {args.seconds:g} s per measurement, median of "
          f"{args.rounds} rounds ({elapsed:.0f} s in all, {elapsed / max(1, args.rounds):.0f} s a round); "
          f"RLIMIT_NOFILE {nofile}")
    rates, cpu = [], []
    for name, by in summary.items():
        for shape in args.shapes:
            keep, close = by.get((shape, KEEP)), by.get((shape, CLOSE))
            if keep is None:
                continue
            rates.append({"server": name, "shape": wrk_label(shape), "keep_rps": keep["rps"],
                          "keep_p99_ms": keep["p99_ms"], "close_rps": close and close["rps"],
                          "close_p99_ms": close and close["p99_ms"],
                          "errors": int(keep["errors"] + (close["errors"] if close else 0)),
                          "timeouts": int(keep["timeouts"] + (close["timeouts"] if close else 0)),
                          "keep_sockets": keep["sockets"]})
            for mode in modes(shape):
                row = by[(shape, mode)]
                cpu.append({"server": name, "shape": wrk_label(shape), "mode": mode,
                            "us/req": row["total"], **{p: row[p] for p in CPU_PARTS}})
    print_table(rates, ["server", "shape", "keep_rps", "keep_p99_ms", "close_rps", "close_p99_ms",
                        "errors", "timeouts", "keep_sockets"], ratios=[])
    print("\nwhere the CPU goes, microseconds per request (primary = the main process, workers = all"
          " its descendants)")
    print_table(cpu, ["server", "shape", "mode", "us/req", *CPU_PARTS], ratios=[])
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for name, runs in results.items():
        if bad := sum(r["fd_errors"] for r in runs):
            print(f"WARNING {name}: {bad} 'Too many open files' lines on its stderr")

    recs = records(summary)
    medians = {(r["case"], r["subject"], r["metric"]): r["value"] for r in recs}
    print()
    verdicts = check(lambda c, s, m: medians.get((c, s, m)), tuple(args.shapes))
    for status, label, figure in verdicts:
        if status != "n/a":
            print(f"{status} {label}: {figure}")
    emit_records(recs, skipped=skipped)
    return 1 if any(v[0] == "MISS" for v in verdicts) else 0


def summarize(results: dict[str, list[dict[Any, Any]]], shapes: list[str]) -> dict[str, dict[Any, Any]]:
    """server -> (shape, mode) -> the median over the rounds of each figure."""
    out: dict[str, dict[Any, Any]] = {}
    for name, runs in results.items():
        for shape in shapes:
            for mode in modes(shape):
                got = [r[(shape, mode)] for r in runs if (shape, mode) in r]
                if got:
                    out.setdefault(name, {})[(shape, mode)] = {
                        k: median([g[k] for g in got if g[k] is not None] or [0.0]) for k in got[0]
                    }
    return out


def records(summary: dict[str, dict[Any, Any]]) -> list[dict[str, Any]]:
    """scripts/bench's records: per server and measurement, rate, latency, errors, then the CPU."""
    out = []
    for name, by in summary.items():
        subject = name.replace("-", " ")
        for (shape, mode), row in by.items():
            c, cc = case(shape, mode), cpu_case(shape, mode)
            out += [
                record("serve", c, subject, "req/s", row["rps"], "req/s"),
                record("serve", c, subject, "p50 ms", row["p50_ms"], "ms", higher=False),
                record("serve", c, subject, "p99 ms", row["p99_ms"], "ms", higher=False),
                record("serve", c, subject, "errors", row["errors"], "", higher=False),
                record("serve", c, subject, "timeouts", row["timeouts"], "", higher=False),
                record("serve", cc, subject, CPU_TOTAL, row["total"], "us", higher=False),
            ]
            if shape == "many":
                out.append(record("serve", c, subject, SOCKETS, row["sockets"], "sockets"))
            out += [record("serve", cc, subject, p, row[p], "us", higher=False) for p in CPU_PARTS]
    return out


if __name__ == "__main__":
    sys.exit(main())
