"""What a person reads: the start-up banner, the primary's event lines, the `ctl status` table.

The primary's lines start with a timestamp (prefork/logline.py says which and why) and the
`[prefork]` tag; with `--log-format json` each is one JSON object (ts, level, msg) instead.
"""

from __future__ import annotations

import os
import time
from typing import Any, TextIO

from prefork import _stdio, logline, proctitle

# words that make an event line more than news (the supervisor's lines carry no level of their own)
_ERROR_WORDS = ("giving up",)
_WARNING_WORDS = ("died", "failed", "could not", "cannot", "did not", "SIGKILL", "timed out", "hung",
                  "not responding")


def configure(opts: dict[str, Any]) -> None:
    """The primary's log format, from its options; its workers are told through the environment
    (PREFORK_LOG_FORMAT, taken out again by each worker: logline.take_worker_format)."""
    fmt = opts.get("log_format") or "text"
    os.environ[logline.ENV_FORMAT] = fmt
    if fmt != logline.state["format"]:
        logline.configure(fmt)


def worker_log_options(opts: dict[str, Any]) -> dict[str, Any]:
    """What a serve worker needs to log as asked; a bad --access-log-format is a usage error,
    found here in the primary before any worker starts."""
    from prefork.http.accesslog import FormatError, compile_format

    from .config import UsageError

    fmt = opts.get("access_log_format")
    if fmt is not None:
        try:
            compile_format(fmt)
        except FormatError as exc:
            raise UsageError(str(exc)) from None
    path = opts.get("log_file")
    return {"log_format": opts.get("log_format") or "text", "access_log_format": fmt,
            "log_file": os.path.abspath(path) if path else None}


def level_of(line: str) -> str:
    if any(word in line for word in _ERROR_WORDS):
        return "error"
    if any(word in line for word in _WARNING_WORDS):
        return "warning"
    return "info"


def log(line: str, stream: TextIO | None = None, level: str | None = None) -> None:
    """One line from the primary (worker started, stopped, replaced and why); a closed log pipe
    is silenced, never fatal (prefork/_stdio.py). With --name the tag is the name, `[api]`: it says
    which server speaks when several log to one place, as `[worker N]` says which worker."""
    server = proctitle.name()
    if logline.is_json():
        logline.emit(level or level_of(line), line, stream, **({"name": server} if server else {}))
    else:
        _stdio.write(f"{logline.stamp()} [{server or 'prefork'}] {line}\n",
                     logline.raw(stream) if stream else None)


def error(message: str) -> None:
    if logline.is_json():
        logline.emit("error", message)
    else:
        _stdio.write(f"prefork: error: {message}\n")


def banner(rows: list[tuple[str, str]], title: str) -> None:
    """A table for a person; in JSON, one object: msg the whole banner on one line, and its rows
    as the fields of `banner`."""
    if logline.is_json():
        fields = {k: v for k, v in rows}
        logline.emit("info", title + ": " + "; ".join(f"{k} {v}" for k, v in rows), banner=fields)
        return
    width = max(len(k) for k, _ in rows)
    lines = [f"{logline.stamp()} {title}"] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
    _stdio.write("\n".join(lines) + "\n")


def human_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


COLUMNS = ("id", "pid", "state", "uptime", "restarts", "conns", "reqs", "in flight", "rss", "uss", "cpu%")


def status_table(status: dict[str, Any]) -> str:
    """The workers as `pm2 ls` shows processes: one row each, right-aligned numbers."""
    rows = []
    for w in status.get("workers", []):
        rows.append((str(w.get("id")), str(w.get("pid")), str(w.get("state")), human_seconds(w.get("uptime")),
                     str(w.get("restarts", 0)), str(w.get("connections", 0)), str(w.get("requests", 0)),
                     str(w.get("in_flight", 0)), human_bytes(w.get("rss")),
                     human_bytes(w.get("uss")), f"{w.get('cpu', 0.0):.1f}"))
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    left = {0, 2}

    def fmt(cells: tuple[str, ...]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in pairs)

    head = (f"prefork {status.get('version', '?')}  primary pid {status.get('pid')}  "
            f"policy {status.get('policy')}  workers {len(rows)}"
            + (f"/{status['target']}" if status.get("target") not in (None, len(rows)) else "")
            + ("  (stopping)" if status.get("stopping") else ""))
    addresses = status.get("addresses") or []
    lines = [head]
    if addresses:
        lines.append("listening on " + ", ".join(addresses))
    if status.get("workers_how"):
        lines.append(f"workers: {status['workers_how']}")
    reload = status.get("reload") or {}
    if reload.get("state") in ("running", "failed"):
        lines.append(f"reload {reload['state']}" + (f": {reload['error']}" if reload.get("error") else ""))
    if status.get("last_error"):
        lines.append(f"last error: {status['last_error']}")
    upgrade = status.get("upgrade") or {}  # the last hot upgrade (upgrade.py)
    if upgrade.get("state"):
        lines.append(f"last upgrade: {upgrade['state']}: {upgrade.get('message', '')}")
    lines += ["", fmt(COLUMNS), fmt(tuple("-" * w for w in widths))]
    lines += [fmt(r) for r in rows]
    totals = [sum(int(w.get(k, 0) or 0) for w in status.get("workers", []))
              for k in ("connections", "requests", "in_flight")]
    lines.append(f"total: {totals[0]} connections, {totals[1]} requests, {totals[2]} in flight  "
                 f"({time.strftime('%H:%M:%S')})")
    return "\n".join(lines)
