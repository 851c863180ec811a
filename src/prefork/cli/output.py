"""What a person reads: the start-up banner, the primary's event lines, the `ctl status` table."""

from __future__ import annotations

import time
from typing import Any, TextIO

from prefork import _stdio


def log(line: str, stream: TextIO | None = None) -> None:
    """One line from the primary (worker started, stopped, replaced and why); a closed log pipe
    is silenced, never fatal (prefork/_stdio.py)."""
    _stdio.write(f"[prefork] {line}\n", stream)


def error(message: str) -> None:
    _stdio.write(f"prefork: error: {message}\n")


def banner(rows: list[tuple[str, str]], title: str) -> None:
    width = max(len(k) for k, _ in rows)
    lines = [title] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
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


COLUMNS = ("id", "pid", "state", "uptime", "restarts", "conns", "reqs", "in flight", "rss", "cpu%")


def status_table(status: dict[str, Any]) -> str:
    """The workers as `pm2 ls` shows processes: one row each, right-aligned numbers."""
    rows = []
    for w in status.get("workers", []):
        rows.append((str(w.get("id")), str(w.get("pid")), str(w.get("state")), human_seconds(w.get("uptime")),
                     str(w.get("restarts", 0)), str(w.get("connections", 0)), str(w.get("requests", 0)),
                     str(w.get("in_flight", 0)), human_bytes(w.get("rss")), f"{w.get('cpu', 0.0):.1f}"))
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
    lines += ["", fmt(COLUMNS), fmt(tuple("-" * w for w in widths))]
    lines += [fmt(r) for r in rows]
    totals = [sum(int(w.get(k, 0) or 0) for w in status.get("workers", []))
              for k in ("connections", "requests", "in_flight")]
    lines.append(f"total: {totals[0]} connections, {totals[1]} requests, {totals[2]} in flight  "
                 f"({time.strftime('%H:%M:%S')})")
    return "\n".join(lines)
