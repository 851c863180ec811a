"""IPC bench: prefork's primary<->worker channel against Node's cluster IPC, side by side.

    python bench/ipc.py [--runs 3] [--seconds 2] [--serialization json|pickle] [--only prefork|node]

Both sides do the same thing (see bench/node/ipc.js): the primary forks one worker, then
- rtt_small / rtt_64k / rtt_16m: round trips with one message in flight; the worker echoes, and the
  primary's next send happens inside its 'message' callback;
- stream_small / stream_64k / stream_16m: the primary sends as fast as it can (at most two batches
  unwritten, tracked with the send callback), the worker counts, and the clock stops when the worker
  replies with its count.
The small message is 64 bytes of JSON ({"type":"ping","n":123,"s":"hello..."}), the others are the
same dict whose string is 64 KiB or 16 MiB long. Each measurement lasts `--seconds` but goes on until
at least MIN_MSGS messages completed (a 16 MiB round trip takes tens to hundreds of ms), and stops
at limit(seconds) whatever it got.
prefork's stream is sent from its loop thread (where its callbacks run, as Node's run on its event
loop); `stream_small_main_thread` (prefork only) sends it from the main thread instead.
Readers may poll briefly after a send (PREFORK_IPC_SPIN_US, default 50; src/prefork/spin.py says when).

Each case runs in three CPU placements (--placements): `one` (both processes on one CPU), `two` (the
primary on one CPU, the worker on another) and `unpinned`. prefork pins every thread of each process
with os.sched_setaffinity; Node's primary starts under `taskset -c`, and its worker is moved by
`taskset -a -p` once online (bench/node/ipc.js). Each side reports where its processes may run, and
the bench checks it. --variants adds prefork subjects with other polling settings (`nospin`,
`fixed:50` for always polling 50 us as before issue 15, `adaptive:25`, ...).
Runs alternate node/prefork; the table shows medians and the prefork/node ratio per placement. The
last stdout line is one JSON line: `{"records": [...], ...}` (see _harness.emit_records) with the
medians as extra keys. `--serialization pickle` compares with Node's "advanced" serialization.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NODE = os.environ.get("NODE", "node")
CTL = "__ctl"
METRICS = ("rtt_small", "rtt_64k", "rtt_16m", "stream_small", "stream_64k", "stream_16m")
CASES = {  # metric -> the case name of its record
    "rtt_small": "round trips, 64 B", "rtt_64k": "round trips, 64 KiB", "rtt_16m": "round trips, 16 MiB",
    "stream_small": "streamed, 64 B", "stream_64k": "streamed, 64 KiB", "stream_16m": "streamed, 16 MiB",
}
SIDE_FLAG = "--prefork-side"
PLACEMENTS = {"one": "one CPU", "two": "two CPUs", "unpinned": "unpinned"}  # name -> suffix of the case
MIN_MSGS = 3  # a measurement goes on past its seconds until this many messages completed ...


def limit(seconds: float) -> float:
    """... but never longer than this (then it reports the rate of what completed)."""
    return max(10 * seconds, 10.0)


# -- the prefork side: this same file, run as a primary (and by its worker) ----------------------

def pin_all(cpu: int) -> None:
    """Every thread of this process on `cpu` (as `taskset -a`); threads started later inherit it."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except OSError:  # a thread that ended meanwhile
            pass


def placed_cpus() -> list[int]:
    """IPC_CPUS: "" (unpinned), "A" (both on CPU A) or "A,B" (the primary on A, the worker on B)."""
    return [int(c) for c in os.environ.get("IPC_CPUS", "").split(",") if c]


def fix_spin() -> None:
    """IPC_SPIN_MODE=fixed: poll after every send whatever the placement (prefork before issue 15)."""
    if os.environ.get("IPC_SPIN_MODE") == "fixed":
        from prefork import spin

        spin.Spin.allowed = lambda self, now: self.budget  # type: ignore[method-assign]


def prefork_worker() -> None:
    import prefork as cluster

    if cpus := placed_cpus():
        pin_all(cpus[-1])
    fix_spin()
    me = cluster.worker
    send = me.send
    state = {"mode": "echo", "count": 0}

    def on_message(m: Any, handle: Any) -> None:
        if m["type"] == CTL:
            op = m["op"]
            if op in ("echo", "count"):
                state["mode"], state["count"] = op, 0
                send({"type": CTL, "op": "ack"})
            elif op == "end":
                send({"type": CTL, "op": "count", "n": state["count"]})
                state["count"] = 0
            return
        if state["mode"] == "echo":
            send(m)
        else:
            state["count"] += 1

    me.on("message", on_message)


class Waiter:
    """The primary's control messages, waited for from the main thread."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.cond = threading.Condition()
        self.got: list[dict[str, Any]] = []
        worker.on("message", self._on)

    def _on(self, m: Any, handle: Any) -> None:
        if m["type"] == CTL:
            with self.cond:
                self.got.append(m)
                self.cond.notify_all()

    def wait(self, op: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i, m in enumerate(self.got):
                    if m["op"] == op:
                        return self.got.pop(i)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {op!r} from the worker")
                self.cond.wait(left)

    def set_mode(self, op: str) -> None:
        self.worker.send({"type": CTL, "op": op})
        self.wait("ack")


def rtt(waiter: Waiter, msg: Any, seconds: float, min_msgs: int = MIN_MSGS) -> float:
    worker = waiter.worker
    waiter.set_mode("echo")
    done = threading.Event()
    box = [0, 0.0, 0.0, 0.0]  # count, result, deadline, hard stop
    send = worker.send
    now = time.monotonic

    def on(m: Any, handle: Any) -> None:
        if m["type"] == CTL:
            return
        box[0] += 1
        t = now()
        if (t >= box[2] and box[0] >= min_msgs) or t >= box[3]:
            worker.off("message", on)
            box[1] = box[0] / (t - t0)
            done.set()
        else:
            send(msg)

    t0 = now()
    box[2], box[3] = t0 + seconds, t0 + limit(seconds)
    worker.on("message", on)
    send(msg)
    if not done.wait(limit(seconds) + 60):
        raise TimeoutError("round trips stalled")
    return box[1]


def stream(waiter: Waiter, msg: Any, seconds: float, batch: int, min_msgs: int = MIN_MSGS) -> float:
    """As Node's: sends go out from the loop thread (prefork's callbacks run there, as Node's do on
    its event loop), at most two batches unwritten; the callback of a batch's last send moves on."""
    worker = waiter.worker
    send = worker.send
    now = time.monotonic
    st = {"outstanding": 0, "sent": 0, "pumping": False, "deadline": 0.0, "stop": 0.0}
    finished = threading.Event()

    def more() -> bool:
        t = now()
        return (t < st["deadline"] or st["sent"] < min_msgs) and t < st["stop"]

    def on_written() -> None:
        st["outstanding"] -= 1
        if not st["pumping"]:
            pump()

    def pump() -> None:
        st["pumping"] = True
        try:
            while st["outstanding"] < 2 and more():
                for _ in range(batch - 1):
                    send(msg)
                st["outstanding"] += 1
                st["sent"] += batch
                send(msg, callback=on_written)
        finally:
            st["pumping"] = False
        if st["outstanding"] == 0 and not more():
            finished.set()

    def start(m: Any, handle: Any) -> None:  # the worker's ack: we are on the loop thread
        if m["type"] == CTL and m["op"] == "ack":
            worker.off("message", start)
            t = now()
            st["deadline"], st["stop"] = t + seconds, t + limit(seconds)
            pump()

    t0 = now()
    worker.on("message", start)
    worker.send({"type": CTL, "op": "count"})
    waiter.wait("ack")
    if not finished.wait(limit(seconds) + 60):
        raise TimeoutError("stream stalled")
    worker.send({"type": CTL, "op": "end"})
    n = waiter.wait("count")["n"]
    elapsed = now() - t0
    if n != st["sent"]:
        raise RuntimeError(f"worker counted {n} messages, primary sent {st['sent']}")
    return n / elapsed


def stream_from_thread(waiter: Waiter, msg: Any, seconds: float, batch: int,
                       min_msgs: int = MIN_MSGS) -> float:
    """The same, but sent from the main thread while the loop thread flushes (the GIL is shared)."""
    worker = waiter.worker
    waiter.set_mode("count")
    send = worker.send
    now = time.monotonic
    t0 = now()
    deadline = t0 + seconds
    sent = 0
    prev: threading.Event | None = None
    while (now() < deadline or sent < min_msgs) and now() < t0 + limit(seconds):
        for _ in range(batch - 1):
            send(msg)
        done = threading.Event()
        send(msg, callback=done.set)
        sent += batch
        if prev is not None:
            prev.wait()
        prev = done
    if prev is not None:
        prev.wait()
    worker.send({"type": CTL, "op": "end"})
    n = waiter.wait("count")["n"]
    elapsed = now() - t0
    if n != sent:
        raise RuntimeError(f"worker counted {n} messages, primary sent {sent}")
    return n / elapsed


def prefork_primary(seconds: float, warmup: float, serialization: str) -> None:
    import prefork as cluster

    cluster.setup_primary(serialization=serialization)
    worker = cluster.fork()
    online = threading.Event()
    worker.once("online", lambda: online.set())
    if not online.wait(30):
        raise TimeoutError("worker not online")
    waiter = Waiter(worker)
    small = {"type": "ping", "n": 123, "s": "hello" + "." * 29}  # 64 bytes of JSON
    big = {"type": "ping", "n": 123, "s": "x" * (64 * 1024)}
    huge = {"type": "ping", "n": 123, "s": "x" * (16 * 1024 * 1024)}
    assert len(json.dumps(small, separators=(",", ":"))) == 64

    def measure(fn: Any, msg: Any, *extra: Any) -> float:
        if warmup > 0:  # it needs only one message (16 MiB ones are slow)
            fn(waiter, msg, warmup, *extra, 1)
        return fn(waiter, msg, seconds, *extra)

    cases = {
        "rtt_small": (rtt, small), "rtt_64k": (rtt, big), "rtt_16m": (rtt, huge),
        "stream_small": (stream, small, 256), "stream_64k": (stream, big, 16),
        "stream_16m": (stream, huge, 1),
        "stream_small_main_thread": (stream_from_thread, small, 256),
    }
    wanted = os.environ.get("IPC_METRICS", "").split(",")
    result = {k: measure(*case) for k, case in cases.items() if k in wanted or wanted == [""]}
    from prefork.spin import cpus_of

    out: dict[str, Any] = {k: round(v, 1) for k, v in result.items()}
    out["cpus"] = {"primary": sorted(cpus_of(os.getpid()) or ()),
                   "worker": sorted(cpus_of(worker.process.pid) or ())}
    print(json.dumps(out), flush=True)
    worker.kill()


def prefork_side(argv: list[str]) -> None:
    import prefork as cluster

    if cluster.is_worker:
        prefork_worker()
        return
    if cpus := placed_cpus():
        pin_all(cpus[0])  # before the primary starts its threads: they inherit it
    fix_spin()
    seconds = float(argv[0]) if argv else 2.0
    warmup = float(os.environ.get("IPC_WARMUP", "0.2"))
    prefork_primary(seconds, warmup, os.environ.get("IPC_SERIALIZATION", "json"))


# -- the driver ---------------------------------------------------------------------------------

def placement_cpus(placement: str) -> list[int]:
    """The CPUs a placement uses: the first two this bench may run on."""
    mine = sorted(os.sched_getaffinity(0))
    if placement == "unpinned":
        return []
    if placement == "two" and len(mine) < 2:
        raise SystemExit("the `two` placement needs two CPUs (--placements one,unpinned)")
    return mine[:1] if placement == "one" else mine[:2]


def variant_env(variant: str) -> dict[str, str]:
    """adaptive (the default), nospin, fixed:US (always polls US), adaptive:US."""
    mode, _, us = variant.partition(":")
    if mode == "nospin":
        return {"PREFORK_IPC_SPIN_US": "0"}
    if mode not in ("adaptive", "fixed"):
        raise SystemExit(f"unknown variant {variant!r}: adaptive, nospin, fixed:US, adaptive:US")
    env = {"IPC_SPIN_MODE": mode}
    if us or mode == "fixed":
        env["PREFORK_IPC_SPIN_US"] = us or "50"
    return env


def subject_of(side: str) -> str:
    """The record's subject: node, prefork (the default build), prefork fixed:50, ..."""
    return side if side in ("node", "prefork", "prefork:adaptive") else side.replace(":", " ", 1)


def run_side(side: str, seconds: float, serialization: str, placement: str) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from _harness import start_process, stop_process

    cpus = placement_cpus(placement)
    if side == "node":
        argv = [NODE, str(HERE / "node" / "ipc.js"), str(seconds)]
        if cpus:  # the primary from its start; ipc.js moves the worker once it is online
            argv = ["taskset", "-c", str(cpus[0]), *argv]
        env = {"IPC_SERIALIZATION": "advanced" if serialization == "pickle" else "json",
               "IPC_WORKER_CPUS": str(cpus[-1]) if cpus else ""}
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), SIDE_FLAG, str(seconds)]
        env = {"IPC_SERIALIZATION": serialization, "IPC_CPUS": ",".join(map(str, cpus)),
               **variant_env(side.partition(":")[2] or "adaptive")}
    p = start_process(argv, env=env, ready_line=None)
    try:
        # every measurement (and its warm-up) may run up to limit(seconds)
        line = p.next_line(timeout=2 * len(METRICS) * (limit(seconds) + 1) + 120)
    finally:
        stop_process(p, timeout=5)
    got = json.loads(line)
    where = got.pop("cpus", None)
    if cpus and where != {"primary": cpus[:1], "worker": cpus[-1:]}:
        raise RuntimeError(f"{side} did not run where placed ({placement}: {cpus}): {where}")
    return {k: float(v) for k, v in got.items()}


def main() -> None:
    sys.path.insert(0, str(HERE))
    from _harness import emit_records, median, print_table, record

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--serialization", choices=("json", "pickle"), default="json")
    ap.add_argument("--only", choices=("prefork", "node"), default=None, help="run one side only")
    ap.add_argument("--placements", default="one,two,unpinned", help="of: " + ", ".join(PLACEMENTS))
    ap.add_argument("--metrics", default=",".join(METRICS), help="a subset of: " + ", ".join(METRICS))
    ap.add_argument("--variants", default="", help="more prefork subjects, comma-separated: nospin, "
                    "fixed:US, adaptive:US (the default prefork is adaptive with PREFORK_IPC_SPIN_US)")
    args = ap.parse_args()

    metrics = [m for m in args.metrics.split(",") if m]
    if bad := [m for m in metrics if m not in METRICS]:
        raise SystemExit(f"unknown metrics {bad}: use {', '.join(METRICS)}")
    if metrics != list(METRICS):
        os.environ["IPC_METRICS"] = ",".join(metrics)  # both sides measure only these
    placements = [p for p in args.placements.split(",") if p]
    if bad := [p for p in placements if p not in PLACEMENTS]:
        raise SystemExit(f"unknown placements {bad}: use {', '.join(PLACEMENTS)}")
    sides = [args.only] if args.only else ["node", "prefork"]
    if args.only != "node":
        sides += [f"prefork:{v}" for v in args.variants.split(",") if v]
    runs: dict[tuple[str, str], list[dict[str, float]]] = {(pl, s): [] for pl in placements for s in sides}
    for i in range(args.runs):
        for pl in placements:
            for side in sides if i % 2 == 0 else reversed(sides):
                r = run_side(side, args.seconds, args.serialization, pl)
                runs[pl, side].append(r)
                print(f"# run {i + 1} {pl} {side}: {json.dumps(r)}", file=sys.stderr, flush=True)
    med = {key: {k: median([r[k] for r in rs]) for k in metrics} for key, rs in runs.items()}
    out: dict[str, Any] = {"runs": args.runs, "seconds": args.seconds, "serialization": args.serialization}
    records = []
    for pl in placements:
        print(f"\n{PLACEMENTS[pl]}:")
        rows = [{"metric": k, **{s: med[pl, s][k] for s in sides}} for k in metrics]
        print_table(rows, ["metric", *sides], [(s, "node") for s in sides if s != "node"] if "node" in sides
                    else [])
        out[pl] = {s: med[pl, s] for s in sides}
        for s in sides:
            if s.startswith("prefork"):  # not in Node's set: the same stream, sent from the main thread
                extra = "stream_small_main_thread"
                if got := [r[extra] for r in runs[pl, s] if extra in r]:
                    out[pl][s][extra] = median(got)
        if "node" in sides:
            out[pl]["ratio"] = {s: {k: round(med[pl, s][k] / med[pl, "node"][k], 3) for k in metrics
                                    if med[pl, "node"][k]} for s in sides if s != "node"}
        records += [record("ipc", f"{CASES[k]}, {PLACEMENTS[pl]}", subject_of(s), "msg/s",
                           round(med[pl, s][k], 1), "msg/s", higher=True) for k in metrics for s in sides]
    emit_records(records, **out)


if __name__ == "__main__":
    if SIDE_FLAG in sys.argv:
        prefork_side(sys.argv[sys.argv.index(SIDE_FLAG) + 1:])
    else:
        main()
