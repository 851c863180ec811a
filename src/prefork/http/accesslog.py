"""Access log lines with gunicorn's atoms (`--access-log-format`), which uvicorn lacks.

A format is compiled once (in the primary first, so a bad one ends the command before any worker
starts) into literal pieces and getters; a request then costs one pass over them. The atoms are
gunicorn's (its docs, "access_log_format"):

  h remote address     l '-'                u user (HTTP Basic)   t [date]        r request line
  m method             U path               q query string        H protocol      s status
  B bytes              b bytes or '-'       f referer             a user agent    p pid
  T seconds (int)      D microseconds       M milliseconds        L seconds (decimal)
  {name}i request header    {name}o response header    {name}e environment variable

`%%` is a literal `%`. An unknown atom or a `%` not followed by `(name)s` is an error.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Callable
from typing import Any

DEFAULT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s'  # Common Log Format, as gunicorn's default
_ATOM = re.compile(r"%\(([^()]*)\)s")
_BRACED = re.compile(r"\{([^{}]+)\}([ioe])")


class FormatError(ValueError):
    """A bad --access-log-format; the message names the problem and where."""


class Entry:
    """One finished request, as the atoms see it."""

    __slots__ = ("scope", "status", "size", "duration", "response_headers", "_request_headers")

    def __init__(self, scope: Any, status: int, size: int, duration: float,
                 response_headers: Any = ()) -> None:
        self.scope = scope
        self.status = status
        self.size = size
        self.duration = duration
        self.response_headers = response_headers or ()
        self._request_headers: dict[str, str] | None = None

    def request_header(self, name: str) -> str | None:
        if self._request_headers is None:
            found: dict[str, str] = {}
            for key, value in self.scope.get("headers") or ():
                found.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
            self._request_headers = found
        return self._request_headers.get(name)

    def response_header(self, name: str) -> str | None:
        for key, value in self.response_headers:
            if key.decode("latin-1").lower() == name:
                return str(value.decode("latin-1"))
        return None

    @property
    def client(self) -> str:
        client = self.scope.get("client")
        return str(client[0]) if client else "-"

    @property
    def path(self) -> str:
        path = self.scope.get("raw_path") or self.scope.get("path", "").encode()
        return path.decode("latin-1") if isinstance(path, bytes) else str(path)

    @property
    def query(self) -> str:
        return (self.scope.get("query_string") or b"").decode("latin-1")

    @property
    def method(self) -> str:
        return str(self.scope.get("method", "-"))

    @property
    def protocol(self) -> str:
        return f"HTTP/{self.scope.get('http_version', '1.1')}"

    def request_line(self) -> str:
        query = self.query
        return f"{self.method} {self.path}{'?' + query if query else ''} {self.protocol}"


def _user(e: Entry) -> str:
    auth = e.request_header("authorization") or ""
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "basic" and token:
        try:
            return base64.b64decode(token.strip(), validate=True).decode("utf-8").split(":", 1)[0] or "-"
        except (ValueError, UnicodeDecodeError):
            return "-"
    return "-"


ATOMS: dict[str, Callable[[Entry], str]] = {
    "h": lambda e: e.client,
    "l": lambda e: "-",
    "u": _user,
    "t": lambda e: time.strftime("[%d/%b/%Y:%H:%M:%S %z]"),
    "r": Entry.request_line,
    "m": lambda e: e.method,
    "U": lambda e: e.path.partition("?")[0],
    "q": lambda e: e.query,
    "H": lambda e: e.protocol,
    "s": lambda e: str(e.status),
    "B": lambda e: str(e.size),
    "b": lambda e: str(e.size) if e.size else "-",
    "f": lambda e: e.request_header("referer") or "-",
    "a": lambda e: e.request_header("user-agent") or "-",
    "T": lambda e: str(int(e.duration)),
    "D": lambda e: str(int(e.duration * 1_000_000)),
    "M": lambda e: str(int(e.duration * 1000)),
    "L": lambda e: f"{e.duration:.6f}",
    "p": lambda e: f"<{os.getpid()}>",
}


def _braced(name: str, kind: str) -> Callable[[Entry], str]:
    if kind == "i":
        return lambda e: e.request_header(name) or "-"
    if kind == "o":
        return lambda e: e.response_header(name) or "-"
    return lambda e: os.environ.get(name, "-")


Piece = str | Callable[[Entry], str]


def compile_format(fmt: str) -> list[Piece]:
    """The format as literal strings and getters; FormatError says what is wrong."""
    if not isinstance(fmt, str) or not fmt:
        raise FormatError("--access-log-format: empty format")
    pieces: list[Piece] = []
    pos = 0
    while True:
        i = fmt.find("%", pos)
        if i < 0:
            pieces.append(fmt[pos:])
            break
        pieces.append(fmt[pos:i])
        if fmt.startswith("%%", i):
            pieces.append("%")
            pos = i + 2
            continue
        m = _ATOM.match(fmt, i)
        if m is None:
            raise FormatError(f"--access-log-format: bad '%' at column {i + 1} (write atoms as %(h)s, "
                              f"a literal % as %%): {fmt!r}")
        name = m.group(1)
        braced = _BRACED.fullmatch(name)
        if braced is not None:
            header, kind = braced.groups()
            pieces.append(_braced(header.lower() if kind in "io" else header, kind))
        elif name in ATOMS:
            pieces.append(ATOMS[name])
        else:
            raise FormatError(f"--access-log-format: unknown atom %({name})s (known: "
                              f"{' '.join(ATOMS)}, {{header}}i, {{header}}o, {{variable}}e)")
        pos = m.end()
    return [p for p in pieces if p != ""]


class Formatter:
    """Formats an Entry with a compiled format; the JSON fields too."""

    def __init__(self, fmt: str | None = None) -> None:
        self.format = fmt or DEFAULT
        self.pieces = compile_format(self.format)

    def line(self, entry: Entry) -> str:
        return "".join(p if isinstance(p, str) else p(entry) for p in self.pieces)

    @staticmethod
    def fields(entry: Entry) -> dict[str, Any]:
        return {"method": entry.method, "path": entry.path.partition("?")[0], "status": entry.status,
                "bytes": entry.size, "duration_ms": round(entry.duration * 1000, 3), "client": entry.client}
