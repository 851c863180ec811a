"""A realistic row: FastAPI + pydantic and Flask + Jinja2 under `prefork serve` and its peers, 2 workers each.

    .venv/bin/pip install fastapi; .venv-peers/bin/pip install fastapi flask   # (scripts/bench does it)
    .venv/bin/python bench/realistic.py [--seconds 4] [--rounds 3] [--connections 32] [--only fastapi,prefork]

The apps (bench/apps/): fastapi_json.py takes POST /items with a JSON body validated by a pydantic model,
awaits asyncio.sleep(0.001) and returns a JSON object computed from it (wrk sends the body from
bench/apps/post_json.lua); flask_page.py renders a Jinja2 template of 10 items. The framework does most
of the work here, so a server's own cost matters less, but it must cost nothing: the target is prefork
at least as fast as the best peer, per app and per connection mode (keep-alive, `Connection: close`).

Each server's answer is checked once (status 200, the expected JSON key or HTML title) before wrk
loads it; a wrong answer fails that server's row. Servers are measured in interleaved rounds (the order
rotates each round) and the median of the rounds is shown: this machine is shared and noisy.
--only takes app names, server names or app/server pairs: fastapi, flask, prefork, fastapi/uvicorn.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    _parse_wrk,
    emit_records,
    ensure_wrk,
    free_port,
    median,
    print_table,
    record,
    start_process,
    stop_process,
    wait_http,
)

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
PEERS = ROOT / ".venv-peers" / "bin"  # the peers live in their own venv (scripts/bench makes it)
WORKERS = "2"
LUA = ROOT / "bench" / "apps" / "post_json.lua"

# app -> its import path, the path wrk loads, its wrk script, the label of its cases in the records
APPS: dict[str, dict[str, Any]] = {
    "fastapi": {"target": "bench.apps.fastapi_json:app", "path": "/items", "script": LUA,
                "case": "fastapi json", "needs": ["fastapi"]},
    "flask": {"target": "bench.apps.flask_page:app", "path": "/", "script": None,
              "case": "flask template", "needs": ["flask"]},
}
MODES = (("keep", "keep-alive"), ("close", "Connection: close"))


def _peer(name: str) -> Path:
    """A peer's command: from the peers' venv, else from the project's (older set-ups)."""
    return PEERS / name if (PEERS / name).exists() else BIN / name


def servers(port: int, tmp: str, prefork_args: str = "") -> dict[str, dict[str, Any]]:
    """"app/server" -> argv and what it needs; the flags are bench/serve.py's for each server.

    prefork_args: more flags for prefork serve (to compare its own options, e.g. "--policy none").
    """
    bind = f"127.0.0.1:{port}"
    prefork = [str(BIN / "prefork"), "serve", "--workers", WORKERS, "--bind", bind,
               "--log-level", "warning", "--control", os.path.join(tmp, "ctl.sock"),
               *shlex.split(prefork_args)]
    uvicorn = [str(_peer("uvicorn")), "--workers", WORKERS, "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", "--no-access-log"]
    gunicorn = [str(_peer("gunicorn")), "-w", WORKERS, "-b", bind, "--log-level", "warning"]
    granian = [str(_peer("granian")), "--workers", WORKERS, "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", "--no-access-log"]
    fastapi, flask = APPS["fastapi"]["target"], APPS["flask"]["target"]
    return {
        "fastapi/prefork": {"argv": [*prefork, fastapi]},
        "fastapi/uvicorn": {"argv": [*uvicorn, fastapi]},
        "fastapi/gunicorn-uvicorn": {
            "argv": [*gunicorn, "-k", "uvicorn_worker.UvicornWorker", fastapi], "needs": ["uvicorn-worker"]
        },
        "fastapi/granian": {"argv": [*granian, "--interface", "asgi", fastapi]},
        "flask/prefork": {"argv": [*prefork, flask]},
        "flask/gunicorn-gthread": {"argv": [*gunicorn, "-k", "gthread", "--threads", "4", flask]},
        "flask/granian": {"argv": [*granian, "--interface", "wsgi", flask]},
    }


def available(name: str, spec: dict[str, Any]) -> str | None:
    """Why a server cannot run here, or None."""
    program = Path(spec["argv"][0])
    if not program.exists():
        return f"{program.name} not installed (scripts/bench installs the peers into .venv-peers)"
    venv = program.parent.parent
    for package in [*APPS[name.split("/")[0]]["needs"], *spec.get("needs", [])]:
        if not any(venv.glob(f"lib/python*/site-packages/{package.replace('-', '_')}")):
            return f"{package} not installed in {venv.name} (scripts/bench installs it)"
    return None


def post_body() -> bytes:
    """The JSON body of bench/apps/post_json.lua, so that the check sends what wrk sends."""
    m = re.search(r"^wrk\.body\s*=\s*'(.*)'\s*$", LUA.read_text(), re.M)
    if not m:
        raise RuntimeError(f"no `wrk.body = '...'` line in {LUA}")
    return m.group(1).encode()


def check(app: str, base: str) -> None:
    """One request, the answer checked: RuntimeError naming what is wrong (then the row fails)."""
    if app == "fastapi":
        body = post_body()
        req = urllib.request.Request(base + "/items", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    else:
        req = urllib.request.Request(base + "/")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, got = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, got = e.code, e.read()
    if status != 200:
        raise RuntimeError(f"wrong answer: {req.method} {req.full_url} gave {status}: {got[:200]!r}")
    if app == "fastapi":
        try:
            data = json.loads(got)
        except ValueError:
            raise RuntimeError(f"wrong answer: not JSON: {got[:200]!r}")
        want = round(json.loads(body)["price"] * 1.2, 2)
        if not isinstance(data, dict) or data.get("price_with_tax") != want:
            raise RuntimeError(f"wrong answer: price_with_tax {want} expected in {got[:200]!r}")
    elif b"<title>Items</title>" not in got or got.count(b"<li") != 10:
        raise RuntimeError(f"wrong answer: no <title>Items</title> and 10 items in {got[:200]!r}")


def wrk(url: str, seconds: float, connections: int, close: bool, script: Path | None) -> dict[str, Any]:
    """bench/_harness.py's run_wrk with a Lua script (-s): its figures, errors = socket + non-2xx."""
    argv = [ensure_wrk(), f"-t{min(2, connections)}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--timeout=5s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 40)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    res = _parse_wrk(proc.stdout)
    if res["rps"] is None:
        raise RuntimeError(f"could not parse wrk output:\n{proc.stdout}")
    return res


def measure(name: str, spec: dict[str, Any], port: int, args: argparse.Namespace) -> dict[str, Any]:
    app = APPS[name.split("/")[0]]
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFORK_")}
    env["PYTHONPATH"] = str(ROOT)  # the apps import as bench.apps.* in both venvs
    proc = start_process(spec["argv"], env=env, ready_line=None, cwd=str(ROOT), stderr=None)
    try:
        wait_http(base + "/", proc=proc)
        check(name.split("/")[0], base)
        url, script = base + app["path"], app["script"]
        wrk(url, 1, args.connections, False, script)  # warm-up
        keep = wrk(url, args.seconds, args.connections, False, script)
        close = wrk(url, args.seconds, args.close_connections, True, script)
    finally:
        stop_process(proc, timeout=10.0)
    out = {f"keep_{k}": keep[k] for k in ("rps", "p50_ms", "p99_ms")}
    out.update({f"close_{k}": close[k] for k in ("rps", "p50_ms", "p99_ms")})
    out["errors"] = keep["errors"] + close["errors"]
    return out


def subject(name: str) -> str:
    """The records' subject of "app/server": "prefork", "gunicorn uvicorn", ..."""
    return name.split("/")[1].replace("-", " ")


def records(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The figures as scripts/bench's records: rate, p50 and p99 per server, app and connection mode."""
    out = []
    for name, row in summary.items():
        app = APPS[name.split("/")[0]]["case"]
        for mode, label in MODES:
            case = f"{app}, {label}"
            out += [
                record("realistic", case, subject(name), "req/s", row[f"{mode}_rps"], "req/s"),
                record("realistic", case, subject(name), "p50 ms", row[f"{mode}_p50_ms"], "ms", higher=False),
                record("realistic", case, subject(name), "p99 ms", row[f"{mode}_p99_ms"], "ms", higher=False),
            ]
    return out


def targets(summary: dict[tuple[str, str, str, str], dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(PASS/MISS/n/a, label, measured) for "prefork at least the best peer", per app and mode.

    summary is bench/all.py's: (bench, case, subject, metric) -> {"median": ...}; the rows have the
    shape of all.py's check_targets. No allowance for noise: at least means >= 1.00x.
    """
    out = []
    for app in APPS.values():
        for _, mode in MODES:
            case = f"{app['case']}, {mode}"
            label = f"{app['case']} ({mode}): prefork at least the best peer"
            rates = {s: v["median"] for (b, c, s, m), v in summary.items()
                     if b == "realistic" and c == case and m == "req/s" and v.get("median")}
            ours = rates.pop("prefork", None)
            if ours is None or not rates:
                out.append(("n/a", label, "not measured"))
                continue
            best = max(rates, key=rates.__getitem__)
            ratio = ours / rates[best]
            figure = f"{ratio:.2f}x {best} ({ours:,.0f} vs {rates[best]:,.0f} req/s; target >= 1)"
            out.append(("PASS" if ratio >= 1.0 else "MISS", label, figure))
    return out


def selected(names: list[str], only: str) -> list[str]:
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    if not wanted:
        return names
    return [n for n in names if n in wanted or n.split("/")[0] in wanted or n.split("/")[1] in wanted]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="wrk duration per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median shown)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections, keep-alive")
    parser.add_argument("--close-connections", type=int, default=None,
                        help="wrk connections, Connection: close (default: --connections)")
    parser.add_argument("--only", default="", help="comma-separated apps, servers or app/server names")
    parser.add_argument(
        "--prefork-args", default="", help='more prefork serve flags, given as --prefork-args="--policy none"'
    )
    args = parser.parse_args()
    if args.close_connections is None:
        args.close_connections = args.connections

    tmp = tempfile.mkdtemp(prefix="prefork-bench-")  # prefork's control socket
    atexit.register(shutil.rmtree, tmp, True)
    names = selected(list(servers(0, tmp)), args.only)
    skipped = {n: why for n in names if (why := available(n, servers(0, tmp)[n]))}
    names = [n for n in names if n not in skipped]
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    failures: dict[str, str] = {}
    for rnd in range(args.rounds):
        shift = rnd % len(names) if names else 0  # rotate, so no server always follows the same one
        for name in names[shift:] + names[:shift]:
            port = free_port()
            try:
                res = measure(name, servers(port, tmp, args.prefork_args)[name], port, args)
            except Exception as exc:
                failures[name] = str(exc)
                print(f"round {rnd + 1}/{args.rounds} {name:24s} FAILED: {exc}", flush=True)
                continue
            results[name].append(res)
            print(
                f"round {rnd + 1}/{args.rounds} {name:24s} keep-alive {res['keep_rps']:8.0f} req/s "
                f"p99 {res['keep_p99_ms']:6.2f} ms | close {res['close_rps']:7.0f} req/s "
                f"p99 {res['close_p99_ms']:6.2f} ms | errors {res['errors']}",
                flush=True,
            )

    rows: list[dict[str, Any]] = []
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        runs = results[name]
        if not runs:
            rows.append({"server": name, "errors": "FAILED"})
            continue
        row: dict[str, Any] = {"server": name}
        for key in ("keep_rps", "keep_p50_ms", "keep_p99_ms", "close_rps", "close_p50_ms", "close_p99_ms"):
            row[key] = median([r[key] for r in runs if r[key] is not None] or [0.0])
        row["errors"] = sum(r["errors"] for r in runs)
        summary[name] = row
        rows.append(row)
    print()
    print(
        f"FastAPI POST /items (pydantic, 1 ms await) and Flask GET / (Jinja2), {WORKERS} workers each, "
        f"wrk -t2 -c{args.connections} (keep-alive) / -c{args.close_connections} (Connection: close), "
        f"{args.seconds:g} s, median of {args.rounds} rounds"
        + (f"; prefork serve {args.prefork_args}" if args.prefork_args else "")
    )
    print_table(rows, ["server", "keep_rps", "keep_p99_ms", "close_rps", "close_p99_ms", "errors"], ratios=[])
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for name, why in failures.items():
        print(f"FAILED {name} (in at least one round): {why}")
    recs = records(summary)
    as_all = {(r["bench"], r["case"], r["subject"], r["metric"]): {"median": r["value"]} for r in recs}
    verdicts = targets(as_all)
    print()
    for status, label, figure in verdicts:
        print(f"{status} {label}: {figure}")
    emit_records(recs, skipped=skipped, failed=failures)
    return 0 if all(s != "MISS" for s, _, _ in verdicts) and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
