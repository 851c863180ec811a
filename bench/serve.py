"""`prefork serve` against its peers, hello world, 2 workers each, with wrk on 127.0.0.1, in one run.

    .venv/bin/pip install -e '.[serve,bench]'     # gunicorn, uvicorn-worker, granian (peers only)
    .venv/bin/python bench/serve.py [--seconds 5] [--rounds 3] [--only prefork-asgi,uvicorn]

For every server: requests per second with keep-alive and with `Connection: close` (a new
connection per request, which is where accept hand-off costs show), and p99 latency. Servers are
measured in rounds, interleaved, and the median of the rounds is shown: this machine is shared and
noisy, and interleaving spreads the noise over every server alike.

Targets checked at the end: prefork's ASGI rate at least uvicorn's (same engine, so prefork must
add no cost), and prefork's WSGI rate at least twice gunicorn gthread's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
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

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
PEERS = ROOT / ".venv-peers" / "bin"  # the peers live in their own venv (scripts/bench makes it)
WORKERS = "2"


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


def measure(name: str, spec: dict[str, Any], port: int, args: argparse.Namespace) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFORK_")}
    env.update(spec.get("env", {}))
    env["PYTHONPATH"] = str(ROOT)
    proc = start_process(spec["argv"], env=env, ready_line=None, cwd=str(ROOT), stderr=None)
    try:
        wait_http(url)
        run_wrk(url, 1, args.connections, 2, latency=False)  # warm-up
        keep = run_wrk(url, args.seconds, args.connections, 2)
        close = run_wrk(url, args.seconds, args.close_connections, 2, close=True)
    finally:
        stop_process(proc, timeout=10.0)
    return {
        "keep_rps": keep["rps"],
        "keep_p50_ms": keep["p50_ms"],
        "keep_p99_ms": keep["p99_ms"],
        "close_p50_ms": close["p50_ms"],
        "close_rps": close["rps"],
        "close_p99_ms": close["p99_ms"],
        "errors": keep["errors"] + close["errors"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="wrk duration per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median shown)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections, keep-alive")
    parser.add_argument(
        "--close-connections", type=int, default=32, help="wrk connections, Connection: close"
    )
    parser.add_argument("--only", default="", help="comma-separated server names")
    args = parser.parse_args()

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
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rnd in range(args.rounds):
        for name in names:
            port = free_port()
            try:
                res = measure(name, servers(port, tmp)[name], port, args)
            except Exception as exc:
                print(f"round {rnd + 1}: {name} failed: {exc}", file=sys.stderr)
                continue
            results[name].append(res)
            print(
                f"round {rnd + 1}/{args.rounds} {name:17s} keep-alive {res['keep_rps']:9.0f} req/s "
                f"p99 {res['keep_p99_ms']:6.2f} ms | close {res['close_rps']:8.0f} req/s "
                f"p99 {res['close_p99_ms']:6.2f} ms | errors {res['errors']}",
                flush=True,
            )

    rows = []
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        runs = results[name]
        if not runs:
            continue
        row = {"server": name}
        for key in ("keep_rps", "keep_p50_ms", "keep_p99_ms", "close_rps", "close_p50_ms", "close_p99_ms"):
            row[key] = median([r[key] for r in runs if r[key] is not None] or [0.0])
        row["errors"] = sum(r["errors"] for r in runs)
        summary[name] = row  # type: ignore[assignment]
        rows.append(row)
    print()
    print(
        f"hello world, {WORKERS} workers each, wrk -t2 -c{args.connections} (keep-alive) / "
        f"-c{args.close_connections} (Connection: close), {args.seconds:g} s, median of {args.rounds} rounds"
    )
    print_table(rows, ["server", "keep_rps", "keep_p99_ms", "close_rps", "close_p99_ms", "errors"], ratios=[])
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")

    ok = True

    def target(label: str, a: str, b: str, factor: float, key: str) -> None:
        nonlocal ok
        if a in summary and b in summary and summary[b][key]:
            ratio = summary[a][key] / summary[b][key]
            passed = ratio >= factor * 0.95  # 5% allowance for the noise of a shared machine
            ok &= passed
            print(
                f"{'PASS' if passed else 'FAIL'} {label}: {a} / {b} {key} = {ratio:.2f}x (target {factor:g}x)"
            )

    print()
    for key in ("keep_rps", "close_rps"):
        target("ASGI at least uvicorn", "prefork-asgi", "uvicorn", 1.0, key)
        target("WSGI at least 2x gunicorn gthread", "prefork-wsgi", "gunicorn-gthread", 2.0, key)
    emit_records(records(summary), skipped=skipped)
    return 0 if ok else 1


def records(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The figures as scripts/bench's records: rate, p50 and p99 per server and connection mode."""
    out = []
    for name, row in summary.items():
        subject = name.replace("-", " ")
        for mode, case in (("keep", "hello, keep-alive"), ("close", "hello, Connection: close")):
            out += [
                record("serve", case, subject, "req/s", row[f"{mode}_rps"], "req/s"),
                record("serve", case, subject, "p50 ms", row[f"{mode}_p50_ms"], "ms", higher=False),
                record("serve", case, subject, "p99 ms", row[f"{mode}_p99_ms"], "ms", higher=False),
            ]
    return out


if __name__ == "__main__":
    sys.exit(main())
