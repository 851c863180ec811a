"""Deploy figures (issue 12): respawn after a kill, per-worker memory of a Django app with and
without --preload, and reload time; `prefork serve` against Node's cluster and gunicorn, one run.

    .venv/bin/python bench/deploys.py [--kills 8] [--reloads 5] [--only respawn,memory,reload]

Respawn: every server runs 1 worker, so "ready again" means the same for each. Its worker is
SIGKILLed; the figure is the time from the kill to the first GET / answered 200 again (a new
connection every ~1 ms on 127.0.0.1, up to 4 waiting at once: _procs.until_served), median of
--kills kills. The servers run side by side and are
killed in turn (A, B, C, A, B, C), each at least 1.3 s after it was last ready (prefork counts a
death within 1 s of ready as a crash loop). prefork's own view: the kill to its "is ready" line.
App: tests/apps/hello.py (WSGI), Node: bench/node/reload_master.js MODE=respawn.

Memory: tests/apps/djproj (Django, WSGI), 4 workers each, after requests from 8 threads reached
every worker (the app answers with its pid). Per worker: USS (Private_Clean + Private_Dirty) and
PSS from /proc/PID/smaps_rollup, the mean over the workers. The primary (gunicorn's arbiter) and the
rest of the tree (prefork's template of --preload) are shown apart: their memory is not per worker.

Reload: 2 workers, hello app, idle; SIGHUP to the last old worker gone ("replaced", as Node's
"reloaded": its old workers exited) and, for prefork, to its "reload done" line (every new worker
ready), median of --reloads, the servers reloaded in turn. Node: bench/node/reload_master.js
MODE=kill (the seed's master.js) and MODE=disconnect.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _harness import emit_records, free_port, median, print_table, record  # noqa: E402
from _procs import MB, Server, descendants, get, gone, rollup, until_ok, until_served  # noqa: E402

ROOT = HERE.parent
BIN = ROOT / ".venv" / "bin"
PEERS = ROOT / ".venv-peers" / "bin"  # scripts/bench installs gunicorn and Django there
NODE = os.environ.get("NODE", "node")
APPS = {"hello": "tests.apps.hello:wsgi", "django": "tests.apps.djproj.wsgi:application"}
PAUSE = 1.3  # between kills of one server: past prefork's MIN_UPTIME (src/prefork/supervisor.py)
READY = r"worker \d+ \(pid (\d+)\) is ready"

# prefork's subjects name their flag: which of the two is serve's default has changed (issue 12)
NO, PRE = "prefork serve --no-preload", "prefork serve --preload"
RESPAWN = [NO, PRE, "node cluster", "gunicorn", "gunicorn --preload"]
MEMORY = [NO, "gunicorn", PRE, "gunicorn --preload"]
RELOAD = [NO, "node cluster (kill)", PRE, "node cluster (disconnect)"]
CASES = {
    "respawn": "respawn, kill to a served request, 1 worker",
    "memory": "memory, Django WSGI, 4 workers",
    "reload": "reload, 2 workers, idle",
}


def start(subject: str, app: str, workers: int, tmp: str, node_mode: str = "respawn") -> Server:
    """One server of `subject` on a free port, serving APPS[app] (Node: its own hello)."""
    port = free_port()
    bind = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFORK_", "NODE_CLUSTER_"))}
    env["PYTHONPATH"] = str(ROOT)
    control = None
    if subject.startswith("prefork"):
        control = os.path.join(tmp, f"ctl-{port}.sock")
        argv = [str(BIN / "prefork"), "serve", "--workers", str(workers), "--bind", bind,
                "--no-access-log", "--control", control, APPS[app]]
    elif subject.startswith("gunicorn"):
        gunicorn = PEERS / "gunicorn" if (PEERS / "gunicorn").exists() else BIN / "gunicorn"
        argv = [str(gunicorn), "-w", str(workers), "-b", bind, "--log-level", "warning", APPS[app]]
    else:
        argv = [NODE, str(HERE / "node" / "reload_master.js")]
        env |= {"PORT": str(port), "WORKERS": str(workers), "MODE": node_mode}
    if subject.endswith("preload"):
        argv.insert(-1, subject.rsplit(" ", 1)[1])
    srv = Server(subject, argv, env, port, str(ROOT), control)
    try:
        until_ok(port, time.monotonic() + 60, every=0.05)
        srv.wait_workers(workers)
    except Exception:
        srv.stop()
        raise
    return srv


def available(subjects: list[str]) -> list[str]:
    out = []
    for s in subjects:
        if s.startswith("node") and shutil.which(NODE) is None:
            print(f"skipping {s}: {NODE!r} not found", file=sys.stderr)
        elif s.startswith("gunicorn") and not any((d / "gunicorn").exists() for d in (PEERS, BIN)):
            print(f"skipping {s}: gunicorn not installed (scripts/bench makes .venv-peers)", file=sys.stderr)
        else:
            out.append(s)
    return out


def started(subjects: list[str], app: str, workers: int, tmp: str) -> dict[str, Server]:
    """The servers that started; one that did not is left out, and says why on stderr."""
    servers: dict[str, Server] = {}
    try:
        for s in subjects:
            mode = re.search(r"\((\w+)\)", s)
            try:
                servers[s] = start(s, app, workers, tmp, mode.group(1) if mode else "respawn")
            except (OSError, RuntimeError, TimeoutError) as exc:
                print(f"{s} left out: it did not start: {exc}", file=sys.stderr)
    except BaseException:
        for srv in servers.values():
            srv.stop()
        raise
    return servers


# -- respawn ---------------------------------------------------------------------------------------


def respawn(kills: int, tmp: str) -> dict[str, dict[str, Any]]:
    servers = started(available(RESPAWN), "hello", 1, tmp)
    served: dict[str, list[float]] = {s: [] for s in servers}
    own: dict[str, list[float]] = {s: [] for s in servers}
    last = {s: time.monotonic() for s in servers}
    try:
        for _ in range(kills):
            for name, srv in servers.items():
                time.sleep(max(0.0, last[name] + PAUSE - time.monotonic()))
                (pid,) = srv.wait_workers(1)
                t0 = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                while not gone(pid):  # so that no answer can come from the killed worker
                    time.sleep(0.0001)
                t1 = until_served(srv.port, t0 + 30)
                served[name].append((t1 - t0) * 1000)
                if srv.control:
                    t2, _ = srv.wait_line(READY, t0, 30)
                    own[name].append((t2 - t0) * 1000)
                last[name] = time.monotonic()
    finally:
        for srv in servers.values():
            srv.stop()
    return {s: {"served_ms": median(served[s]), "ready_line_ms": median(own[s]) if own[s] else None,
                "kills": len(served[s])} for s in servers}


# -- memory ----------------------------------------------------------------------------------------


def spread(port: int, workers: int, least: int = 200, cap: int = 2000) -> Counter[int]:
    """Requests from 8 threads, in batches of 50, until `least` were made and every worker served
    at least 5: the pid each Django answer names -> how many it served."""
    served: Counter[int] = Counter()
    with ThreadPoolExecutor(8) as pool:
        while sum(served.values()) < cap:
            for body in pool.map(lambda _: get(port, 10.0), range(50)):
                m = re.search(rb"django (\d+)", body or b"")
                if m is None:
                    raise RuntimeError(f"127.0.0.1:{port}: not a Django answer: {body!r}")
                served[int(m.group(1))] += 1
            if sum(served.values()) >= least and len(served) >= workers and min(served.values()) >= 5:
                break
    return served


def memory_of(srv: Server, workers: int) -> dict[str, Any]:
    served = spread(srv.port, workers)
    time.sleep(0.3)
    pids = srv.wait_workers(workers)
    tree = descendants(srv.pid)
    mem = {p: rollup(p) for p in [srv.pid, *tree]}
    rest = [p for p in tree if p not in pids]  # prefork --preload's template(s)
    return {
        "worker_uss_mb": sum(mem[p]["uss"] for p in pids) / len(pids) / MB,
        "worker_pss_mb": sum(mem[p]["Pss"] for p in pids) / len(pids) / MB,
        "worker_rss_mb": sum(mem[p]["Rss"] for p in pids) / len(pids) / MB,
        "primary_rss_mb": mem[srv.pid]["Rss"] / MB,
        "primary_uss_mb": mem[srv.pid]["uss"] / MB,
        "others": len(rest),
        "others_rss_mb": sum(mem[p]["Rss"] for p in rest) / MB if rest else None,
        "others_uss_mb": sum(mem[p]["uss"] for p in rest) / MB if rest else None,
        "tree_pss_mb": sum(m["Pss"] for m in mem.values()) / MB,
        "requests": "/".join(str(n) for n in sorted(served.values())),
    }


def memory(tmp: str, workers: int = 4) -> dict[str, dict[str, Any]]:
    out = {}
    for s in available(MEMORY):  # one at a time: 4 Django workers each, and nothing else running
        for srv in started([s], "django", workers, tmp).values():
            try:
                out[s] = memory_of(srv, workers)
            finally:
                srv.stop()
    return out


# -- reload ----------------------------------------------------------------------------------------


def reload_once(srv: Server, workers: int) -> tuple[float, float | None]:
    """SIGHUP; (ms to every old worker gone, ms to prefork's "reload done" line)."""
    old = srv.wait_workers(workers)
    t0 = time.monotonic()
    os.kill(srv.pid, signal.SIGHUP)
    if srv.control is None:
        t_done, _ = srv.wait_line(r"^reloaded$", t0, 60)
        return (t_done - t0) * 1000, None
    t_done, m = srv.wait_line(r"reload (done|failed.*)", t0, 60)
    if m.group(1) != "done":
        raise RuntimeError(f"{srv.name}: reload {m.group(1)}")
    deadline = time.monotonic() + 60
    while not all(gone(p) for p in old):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{srv.name}: old workers still running 60 s after the reload")
        time.sleep(0.0005)
    return (time.monotonic() - t0) * 1000, (t_done - t0) * 1000


def reload(reloads: int, tmp: str, workers: int = 2) -> dict[str, dict[str, Any]]:
    servers = started(available(RELOAD), "hello", workers, tmp)
    replaced: dict[str, list[float]] = {s: [] for s in servers}
    ready: dict[str, list[float]] = {s: [] for s in servers}
    try:
        for _ in range(reloads):
            for name, srv in servers.items():
                time.sleep(0.3)
                gone_ms, done_ms = reload_once(srv, workers)
                replaced[name].append(gone_ms)
                if done_ms is not None:
                    ready[name].append(done_ms)
    finally:
        for srv in servers.values():
            srv.stop()
    return {s: {"replaced_ms": median(replaced[s]), "new_ready_ms": median(ready[s]) if ready[s] else None,
                "reloads": len(replaced[s])} for s in servers}


# -- report ----------------------------------------------------------------------------------------


def records(out: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The figures as scripts/bench's records; the first metric of each case is the compared one."""
    metrics = {
        "respawn": [("ms", "served_ms"), ("own ready line ms", "ready_line_ms")],
        "memory": [("worker USS MB", "worker_uss_mb"), ("worker PSS MB", "worker_pss_mb"),
                   ("primary RSS MB", "primary_rss_mb"), ("template RSS MB", "others_rss_mb"),
                   ("template USS MB", "others_uss_mb"), ("tree PSS MB", "tree_pss_mb")],
        "reload": [("replaced ms", "replaced_ms"), ("new ready ms", "new_ready_ms")],
    }
    recs = []
    for part, subjects in out.items():
        for subject, r in subjects.items():
            for metric, key in metrics[part]:
                if r.get(key) is not None:
                    unit = "MB" if metric.endswith("MB") else "ms"
                    recs.append(record("deploys", CASES[part], subject, metric, r[key], unit, higher=False))
    return recs


def ratios(rows: dict[str, dict[str, Any]], key: str, pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{a} / {b}: {rows[a][key] / rows[b][key]:.2f}x" for a, b in pairs
            if a in rows and b in rows and rows[b][key]]


def show(out: dict[str, dict[str, dict[str, Any]]], args: argparse.Namespace) -> None:
    if "respawn" in out:
        r = out["respawn"]
        print(f"respawn: SIGKILL the only worker, median of {args.kills} kills (ms)")
        print_table([{"server": s, **v} for s, v in r.items()], ["server", "served_ms", "ready_line_ms"],
                    ratios=[])
        node = "node cluster"
        print("  " + "; ".join(ratios(r, "served_ms", [(NO, node), (PRE, node), (NO, "gunicorn"),
                                                         (PRE, "gunicorn --preload")])))
    if "memory" in out:
        m = out["memory"]
        print("\nmemory: Django WSGI, 4 workers, after the requests shown (MB)")
        print_table([{"server": s, **v} for s, v in m.items()],
                    ["server", "worker_uss_mb", "worker_pss_mb", "worker_rss_mb", "primary_rss_mb",
                     "others", "others_rss_mb", "others_uss_mb", "tree_pss_mb", "requests"], ratios=[])
        print("  worker USS, " + "; ".join(ratios(m, "worker_uss_mb", [
            (PRE, NO), ("gunicorn --preload", "gunicorn"), (PRE, "gunicorn --preload"), (NO, "gunicorn")])))
    if "reload" in out:
        r = out["reload"]
        print(f"\nreload: SIGHUP, 2 workers, idle, median of {args.reloads} (ms)")
        print_table([{"server": s, **v} for s, v in r.items()], ["server", "replaced_ms", "new_ready_ms"],
                    ratios=[])
        print("  replaced, " + "; ".join(ratios(r, "replaced_ms", [
            (p, n) for p in (NO, PRE)
            for n in ("node cluster (kill)", "node cluster (disconnect)")])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--reloads", type=int, default=5)
    ap.add_argument("--only", default="respawn,memory,reload")
    args = ap.parse_args()
    parts = [p for p in args.only.split(",") if p]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="prefork-deploys-") as tmp:
        for part, run in (("respawn", lambda: respawn(args.kills, tmp)), ("memory", lambda: memory(tmp)),
                          ("reload", lambda: reload(args.reloads, tmp))):
            if part in parts:
                try:
                    out[part] = run()
                except (OSError, RuntimeError, TimeoutError) as exc:  # the other parts still count
                    print(f"{part} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    show(out, args)
    emit_records(records(out), **out)


if __name__ == "__main__":
    main()
