"""The shape of one log line: text with a timestamp, or one JSON object (`--log-format json`).

Every process of a pool picks its format once: the primary from its options (cli/output.py), a
worker from what the primary tells it (PREFORK_LOG_FORMAT for `prefork run`, the options JSON for
`prefork serve`). In JSON mode `sys.stdout` and `sys.stderr` are wrapped (`Lines`), so whatever
else writes there (an app's print(), a traceback, the core's own warnings) still comes out as one
JSON object per line, with the line as `msg`. Only Python-level writes can be wrapped: what C code
writes to descriptor 1 or 2 itself (a C extension's printf, faulthandler's dumps, a program the app
runs with inherited descriptors) comes out as it is.

Timestamps are ISO 8601, local time with its UTC offset, to the millisecond
(2026-11-29T14:49:57.123+01:00): a person reads the host's clock, the offset keeps it unambiguous
for a log shipper, and it matches the zone of the Common Log Format access lines.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from . import _stdio

ENV_FORMAT = "PREFORK_LOG_FORMAT"  # also the option's own variable (cli/config.py)
FORMATS = ("text", "json")

state: dict[str, Any] = {"format": "text", "worker": None}


def stamp() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def is_json() -> bool:
    return state["format"] == "json"


def record(level: str, msg: str, worker: int | None = None, **fields: Any) -> str:
    """One JSON object and its newline; `worker` defaults to this process's worker id."""
    obj: dict[str, Any] = {"ts": stamp(), "level": level, "msg": msg}
    wid = state["worker"] if worker is None else worker
    if wid is not None:
        obj["worker"] = wid
    obj.update(fields)
    return json.dumps(obj, ensure_ascii=False, default=str) + "\n"


def raw(stream: Any) -> Any:
    """The stream under our wrappers (a forked worker inherits the primary's wrapped ones)."""
    while isinstance(stream, Lines):
        stream = stream.target
    return stream


def emit(level: str, msg: str, stream: Any = None, **fields: Any) -> bool:
    """Write one line in the format in force (text: `msg` as it is); never raises."""
    out = raw(stream if stream is not None else sys.stderr)
    text = record(level, msg, **fields) if is_json() else msg + "\n"
    return _stdio.write(text, out)


class Lines(io.TextIOBase):
    """A text stream that hands each whole line to `render`, then writes the result to `target`.

    Whole lines are written at once (a partial line waits for its end, or a flush): print() writes
    its pieces one by one, and two workers sharing a file or terminal would mix them mid-line.
    """

    def __init__(self, target: Any, render: Callable[[str], str]) -> None:
        self.target = target
        self.render = render
        self._partial = ""
        self._lock = threading.Lock()  # a WSGI app prints from several threads at once

    def write(self, text: str) -> int:
        if not text:
            return 0
        with self._lock:
            pending = self._partial + text
            head, sep, self._partial = pending.rpartition("\n")
        if sep:
            _stdio.write("".join(self.render(line) for line in head.split("\n")), self.target)
        return len(text)

    def flush(self) -> None:
        """A closed pipe behind it is silenced (prefork/_stdio.py): the app's print() never fails."""
        with self._lock:
            partial, self._partial = self._partial, ""
        _stdio.write(self.render(partial) if partial else "", self.target)

    def fileno(self) -> int:
        return int(self.target.fileno())

    def isatty(self) -> bool:
        return bool(self.target.isatty())

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(self.target.encoding)

    @property
    def buffer(self) -> Any:
        return self.target.buffer


def json_render(level: str, stream_name: str) -> Callable[[str], str]:
    def render(line: str) -> str:
        return record(level, line.rstrip("\n"), stream=stream_name)
    return render


def wrap_stdio_json() -> None:
    """From now on every line written to sys.stdout / sys.stderr is one JSON object (stderr's
    lines have level "error": tracebacks and warnings go there)."""
    if sys.stdout is not None:
        sys.stdout = Lines(raw(sys.stdout), json_render("info", "stdout"))  # type: ignore[assignment]
    if sys.stderr is not None:
        sys.stderr = Lines(raw(sys.stderr), json_render("error", "stderr"))  # type: ignore[assignment]


def configure(fmt: str, worker: int | None = None) -> None:
    """This process's format; JSON mode wraps sys.stdout and sys.stderr."""
    state["format"] = fmt if fmt in FORMATS else "text"
    state["worker"] = worker
    if is_json():
        wrap_stdio_json()


def take_worker_format(default: str = "text") -> str:
    """In a worker: the format the primary chose, taken out of the environment, so the app and
    the programs it starts do not see it (as child.py does with the other internal variables)."""
    fmt = os.environ.pop(ENV_FORMAT, default)
    return fmt if fmt in FORMATS else default


def json_formatter(worker: int | None) -> Any:
    """A `logging.Formatter` writing a record as one JSON object: ts, level, msg, worker, logger
    (and exc, the traceback). logging is imported here: the primary never needs it."""
    import logging

    class JsonFormatter(logging.Formatter):
        def format(self, rec: logging.LogRecord) -> str:
            fields: dict[str, Any] = {"logger": rec.name}
            if rec.exc_info:
                fields["exc"] = self.formatException(rec.exc_info)
            return record(rec.levelname.lower(), rec.getMessage(), worker, **fields).rstrip("\n")

    return JsonFormatter()
