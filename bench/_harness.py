"""Small stdlib-only helpers shared by the benches (prefork vs Node's cluster, side by side).

Everything talks to 127.0.0.1 only. Servers under test are started in their own process
group so that a bench can always clean up every process it started, and nothing else.
"""

from __future__ import annotations

import math
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

__all__ = [
    "Proc",
    "ensure_wrk",
    "free_port",
    "jain",
    "median",
    "record",
    "emit_records",
    "print_table",
    "run_wrk",
    "start_process",
    "stop_process",
    "wait_http",
]


def ensure_wrk() -> str:
    """Return the path of wrk, installing it with apt-get when root (benches need a real load tool)."""
    path = shutil.which("wrk")
    if path:
        return path
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        for cmd in (
            ["apt-get", "install", "-y", "wrk"],
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "wrk"],
        ):
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            path = shutil.which("wrk")
            if path:
                return path
    raise RuntimeError("wrk not found: install it first (Debian/Ubuntu: `apt-get install -y wrk`)")


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def _parse_wrk(out: str) -> dict[str, Any]:
    """Turn wrk's human output into numbers; kept separate so it can be tested on canned text."""
    res: dict[str, Any] = {"rps": None, "p50_ms": None, "p99_ms": None, "errors": 0, "requests": None}
    if m := re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M):
        res["rps"] = float(m.group(1))
    if m := re.search(r"^\s*(\d+) requests in ([\d.]+)(\w+)", out, re.M):
        res["requests"] = int(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        if m := re.search(rf"^\s*{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M):
            res[key] = _ms(m.group(1), m.group(2))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        res["errors"] += sum(int(g) for g in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        res["errors"] += int(m.group(1))
    return res


def run_wrk(
    url: str,
    seconds: float,
    connections: int,
    threads: int,
    close: bool = False,
    latency: bool = True,
    timeout_s: float = 5.0,
) -> dict[str, Any]:
    """Run wrk once and return {"rps", "p50_ms", "p99_ms", "errors", "requests"} (+ "raw" output).

    close=True sends `Connection: close` so every request pays for a new connection
    (that is what exposes how accepts are spread across workers).
    errors = socket errors (connect+read+write+timeout) + non-2xx/3xx responses.
    """
    threads = max(1, min(threads, connections))
    argv = [ensure_wrk(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    argv += [f"--timeout={max(1, round(timeout_s))}s"]
    if latency:
        argv.append("--latency")
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + timeout_s + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    res = _parse_wrk(proc.stdout)
    if res["rps"] is None:
        raise RuntimeError(f"could not parse wrk output:\n{proc.stdout}")
    res["raw"] = proc.stdout
    return res


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until `url` answers 200 (servers that print no ready line); RuntimeError if `proc` exits first."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout:g}s")
        time.sleep(0.1)


def free_port() -> int:
    """Ask the kernel for a free TCP port on 127.0.0.1 (racy, but fine for local benches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc(subprocess.Popen[bytes]):
    """A Popen whose stdout is drained by a thread into a queue of lines.

    Draining matters: a server that keeps printing (event lines) would otherwise block
    on a full pipe and distort the measurement.
    """

    lines: queue.Queue[bytes | None]  # None marks end of output; consumed by next_line()
    output: list[bytes]  # every line ever printed, consumed or not (e.g. lines before "ready")
    _reader: threading.Thread

    def _start_reader(self) -> None:
        self.lines = queue.Queue()
        self.output = []
        out = self.stdout
        assert out is not None

        def pump(stream: IO[bytes]) -> None:
            for line in iter(stream.readline, b""):
                line = line.rstrip(b"\r\n")
                self.output.append(line)
                self.lines.put(line)
            self.lines.put(None)

        self._reader = threading.Thread(target=pump, args=(out,), daemon=True)
        self._reader.start()

    def next_line(self, timeout: float) -> bytes:
        """Next stdout line (without newline); TimeoutError if none in time, EOFError at end."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output line from pid {self.pid} within {timeout}s") from None
        if line is None:
            self.lines.put(None)  # keep EOF visible to later callers
            raise EOFError(f"pid {self.pid} closed stdout (exit code {self.poll()})")
        return line

    def wait_line(self, pred: bytes | Callable[[bytes], bool], timeout: float) -> bytes:
        """Skip lines until one equals `pred` (bytes) or satisfies pred(line); return it."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.next_line(max(0.0, deadline - time.monotonic()))
            if (line == pred) if isinstance(pred, bytes) else pred(line):
                return line

    def drain(self) -> list[bytes]:
        """Lines buffered so far that nobody consumed yet."""
        out: list[bytes] = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return out
            if line is None:
                self.lines.put(None)
                return out
            out.append(line)


def start_process(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    ready_line: bytes | None = b"ready",
    timeout: float = 30.0,
    cwd: str | None = None,
    stderr: int | IO[Any] | None = None,
) -> Proc:
    """Start argv in its own process group and wait until it prints `ready_line` on stdout.

    env is added to os.environ (benches mostly set PORT/WORKERS). If the process dies or
    stays silent, it is stopped and the error says so. stderr is inherited by default so
    crashes are visible.
    """
    full_env = {**os.environ, **(env or {})}
    p = Proc(
        list(argv),
        env=full_env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        start_new_session=True,
    )
    p._start_reader()
    if ready_line is not None:
        try:
            p.wait_line(ready_line, timeout)
        except (TimeoutError, EOFError) as e:
            stop_process(p, timeout=2.0)
            raise RuntimeError(f"{argv!r} did not print {ready_line!r}: {e}") from None
    return p


def stop_process(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> str:
    """Send `sig` to the leader, wait, then SIGKILL whatever is left of its group; reap.

    The signal goes to the leader only (a primary often wants to ask its workers for
    stats before shutting them down); the group kill afterwards guarantees no leftover
    workers. Returns the stdout not consumed yet (for a Proc), e.g. a final JSON line.
    """
    pgid: int | None
    try:
        pgid = os.getpgid(p.pid)
    except ProcessLookupError:
        pgid = None
    if p.poll() is None:
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    if pgid is not None and pgid == p.pid:  # only ever our own session's group
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    p.wait()
    if isinstance(p, Proc):
        p._reader.join(timeout=5.0)
        return "\n".join(line.decode(errors="replace") for line in p.drain())
    return ""


def median(xs: Sequence[float]) -> float:
    """Median (benches report medians of repeated runs: robust to one noisy run)."""
    if not xs:
        raise ValueError("median of empty sequence")
    s = sorted(xs)
    n = len(s)
    return float(s[n // 2]) if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0


def jain(xs: Sequence[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1.0 = perfectly even, 1/n = one takes all."""
    if not xs:
        raise ValueError("jain of empty sequence")
    sq = sum(x * x for x in xs)
    return 1.0 if sq == 0 else sum(xs) ** 2 / (len(xs) * sq)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and abs(v) < 0.01:
            return f"{v:.2e}"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "-" if v is None else str(v)


def print_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    ratios: Sequence[tuple[str, str]] | None = None,
    file: IO[str] | None = None,
) -> None:
    """Print rows as an aligned table with ratio columns "a/b" for side-by-side comparisons.

    ratios=None means: if there are 3+ columns, add columns[-1]/columns[-2] (e.g. with
    columns ["metric", "node", "prefork"] you get "prefork/node"); pass [] for none.
    """
    if ratios is None:
        ratios = [(columns[-1], columns[-2])] if len(columns) >= 3 else []
    heads = list(columns) + [f"{a}/{b}" for a, b in ratios]
    table: list[list[str]] = []
    for row in rows:
        cells = [_fmt(row.get(c)) for c in columns]
        for a, b in ratios:
            va, vb = row.get(a), row.get(b)
            ok = isinstance(va, (int, float)) and isinstance(vb, (int, float)) and vb != 0
            cells.append(f"{va / vb:.2f}x" if ok else "-")  # type: ignore[operator]
        table.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(heads)]
    out = file or sys.stdout

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    print(line(heads), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in table:
        print(line(r), file=out)
    out.flush()


def record(
    bench: str,
    case: str,
    subject: str,
    metric: str,
    value: float | None,
    unit: str = "",
    higher: bool = True,
) -> dict[str, Any]:
    """One measured figure, the unit scripts/bench collects from every bench and every round.

    bench: the bench file ("serve"); case: what was measured ("hello, keep-alive"); subject: who
    ("prefork asgi", "uvicorn", "node rr"); subjects named "prefork..." are compared with the
    others of the same case; higher: whether a bigger value is better (req/s yes, ms no).
    """
    return {"bench": bench, "case": case, "subject": subject, "metric": metric,
            "value": value, "unit": unit, "higher": higher}


def emit_records(records: Sequence[Mapping[str, Any]], **extra: Any) -> None:
    """Print the records as the last stdout line, `{"records": [...], ...}`, for scripts/bench."""
    import json

    print(json.dumps({"records": list(records), **extra}), flush=True)
