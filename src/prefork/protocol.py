"""prefork's internal messages (frames of kind KIND_INTERNAL, channel.py), and their checks.

Worker to primary:
    {"t": "online"}                                   the worker's runtime is up (not: ready)
    {"t": "listening", "address": [addr, port, type]} it listens (Address.to_wire, address.py)
    {"t": "leaving"}                                  it called its own disconnect() or kill()
    {"t": "fatal", "error": str, "traceback": str}    its script died of an uncaught exception
    {"t": "boot_error", "message": str, "traceback": str (optional)}  `prefork serve`: its app could not start
    ["P", {"connections": int, ...}]                  the answer to a heartbeat, with counters
    {"t": "listen", "seq": int, "family": int, "addr": ..., "backlog": int | None,
     "policy": str} + its hand-off link's two ends (rr, least_conn)     a listen() call
    ["x", handle id]                                  it closed its listener on that handle
    ["M", seq, {"stats": {...}, "duration": [[int, ...], float], "families": [[name, type, help,
     summed lines, own lines], ...], "cut": str}]
                                                      its figures for /metrics (worker_metrics.py)
Primary to worker:
    {"t": "disconnect"}, ["p"] (heartbeat), {"t": "L", "seq": int, ...} (listen's answer),
    ["+", handle id, slot id] + a listening socket, ["-", handle id, slot id],
    ["m", seq, samples, chars] (a scrape of /metrics: answer with "M", at most that many samples
    and characters of the app's registry: the primary's budget for a scrape, shared by the workers)

Everything a worker sends is checked here before the primary acts on it (`check`): a worker is
another process, which may be buggy or hostile, and a bad message must cost it an error, never
cost the primary its supervision.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from typing import Any

from .worker_metrics import BOUNDS, MAX_CHARS, MAX_SAMPLES

POLICIES = ("rr", "none", "reuseport", "least_conn")
FAMILIES = (int(socket.AF_INET), int(socket.AF_INET6), int(socket.AF_UNIX))
MAX_TEXT = 1 << 20  # a traceback or an error message
MAX_STATS = 32  # keys in a heartbeat's counters
MAX_UNIX_PATH = 107  # sun_path less its NUL
MAX_BACKLOG = 65535


class Invalid(ValueError):
    """A message that does not have the shape its kind requires."""


def name_of(message: Any) -> str | None:
    if type(message) is list and message and type(message[0]) is str:
        return message[0]
    if type(message) is dict and type(message.get("t")) is str:
        return message["t"]
    return None


def _text(value: Any, what: str) -> None:
    if type(value) is not str or len(value) > MAX_TEXT:
        raise Invalid(f"{what} must be text of at most {MAX_TEXT} characters")


def _whole(value: Any, what: str, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise Invalid(f"{what} must be a whole number from {low} to {high}, not {value!r}")


def _fds(fds: list[int], allowed: tuple[int, ...]) -> None:
    if len(fds) not in allowed:
        raise Invalid(f"{len(fds)} descriptors where {' or '.join(map(str, allowed))} belong")


def _no_fds(message: Any, fds: list[int]) -> None:
    _fds(fds, (0,))


def _listening(message: Any, fds: list[int]) -> None:
    _fds(fds, (0,))
    address = message.get("address")
    if type(address) is not list or len(address) != 3 or type(address[0]) is not str:
        raise Invalid("listening: address must be [address, port, type]")
    if address[2] not in (4, 6, "unix") or not (address[1] is None or type(address[1]) is int):
        raise Invalid("listening: bad port or address type")


def _fatal(message: Any, fds: list[int]) -> None:
    _fds(fds, (0,))
    _text(message.get("error"), "fatal: error")
    _text(message.get("traceback"), "fatal: traceback")


def _boot_error(message: Any, fds: list[int]) -> None:
    _fds(fds, (0,))
    _text(message.get("message"), "boot_error: message")
    _text(message.get("traceback", ""), "boot_error: traceback")


def _pong(message: Any, fds: list[int]) -> None:
    _fds(fds, (0,))
    if len(message) != 2 or type(message[1]) is not dict or len(message[1]) > MAX_STATS:
        raise Invalid(f"P: counters must be an object of at most {MAX_STATS} entries")
    for key, value in message[1].items():
        if type(value) is not int or not 0 <= value < MAX_VALUE:
            raise Invalid(f"P: counter {key!r} must be a whole number (0 or more), not {value!r}")


_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,199}")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]{0,99}")
FAMILY_TYPES = ("counter", "gauge", "histogram", "summary", "untyped", "gaugehistogram")
MAX_LABELS = 32


SUFFIXES = ("", "_total", "_count", "_sum", "_bucket", "_created", "_gcount", "_gsum", "_info")
MAX_VALUE = 2**63  # an int figure's bound: a bigger one would overflow when summed as a float


def _number(value: Any) -> bool:
    return type(value) is float or (type(value) is int and -MAX_VALUE < value < MAX_VALUE)


def _figures(message: Any, fds: list[int]) -> None:
    """["M", seq, figures]: the worker's answer to a scrape, its envelope and size. Each sample line
    is checked by check_line, which metrics_text.py runs a slice at a time: a big answer must not
    hold the primary's loop (the primary acts on nothing it has not checked)."""
    _fds(fds, (0,))
    if len(message) != 3 or type(message[2]) is not dict or len(message[2]) > 8:
        raise Invalid('M: expected ["M", seq, {figures}]')
    _whole(message[1], "M: seq", 0, 2**62)
    body = message[2]
    _pong(["P", body.get("stats")], fds)
    duration = body.get("duration")
    if duration is not None and not (
            type(duration) is list and len(duration) == 2 and type(duration[0]) is list
            and len(duration[0]) == len(BOUNDS) + 1
            and all(type(n) is int and 0 <= n < MAX_VALUE for n in duration[0]) and _number(duration[1])):
        raise Invalid(f"M: duration must be [{len(BOUNDS) + 1} counts, sum]")
    if body.get("cut") is not None:
        _text(body["cut"], "M: cut")
    families = body.get("families", [])
    if type(families) is not list:
        raise Invalid("M: families must be a list")
    count = chars = 0
    for family in families:
        if type(family) is not list or len(family) != 5 or family[1] not in FAMILY_TYPES \
                or type(family[0]) is not str or not _METRIC_NAME.fullmatch(family[0]) \
                or type(family[2]) is not str or len(family[2]) > 4096 \
                or type(family[3]) is not str or type(family[4]) is not str:
            raise Invalid("M: a family must be [name, type, help, summed lines, own lines]")
        count += 1 + family[3].count("\n") + family[4].count("\n")
        chars += len(family[0]) + len(family[2]) + len(family[3]) + len(family[4])
        if count > MAX_SAMPLES + 1 or chars > MAX_CHARS + 4096:
            raise Invalid(f"M: more than {MAX_SAMPLES} samples or {MAX_CHARS} characters")


_EXP = r"(?:[eE][-+]?[0-9]{1,4})?"
_VALUE = rf"[-+]?(?:[0-9]{{1,400}}(?:\.[0-9]*)?{_EXP}|\.[0-9]+{_EXP}|Inf|NaN)"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]{0,99}="(?:[^"\\\n]|\\[\\"n])*"'
_LINE = re.compile(rf"([a-zA-Z_:][a-zA-Z0-9_:]{{0,199}})(?:\{{({_LABEL}(?:,{_LABEL})*)\}})? ({_VALUE})")
_LABEL_NAMES = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]{0,99})="(?:[^"\\\n]|\\[\\"n])*"')  # labels in turn


def check_line(names: set[str], line: str) -> tuple[str, list[str]]:
    """Raise Invalid unless `line` (without its newline) is a sample of the 0.0.4 text format whose
    name is one of `names` (family_names: no other family's series, no prefork_* one), with
    distinct labels and a number; return its labels' text and their names."""
    match = _LINE.fullmatch(line)
    if match is None or match.group(1) not in names:
        raise Invalid(f"M: not a sample of its family: {line[:200]!r}")
    labels = match.group(2) or ""
    keys = _LABEL_NAMES.findall(labels)
    if len(keys) > MAX_LABELS or len(set(keys)) != len(keys):
        raise Invalid(f"M: too many or repeated labels: {line[:200]!r}")
    return labels, keys


def family_names(name: str) -> set[str]:
    """The sample names a family may have: its name, or that plus a known suffix (check_line)."""
    return {name + suffix for suffix in SUFFIXES}


def _close(message: Any, fds: list[int]) -> None:
    _fds(fds, (0,))
    if len(message) != 2:
        raise Invalid("x: expected [\"x\", handle id]")
    _whole(message[1], "x: handle id", 0, 2**31)


def _listen(message: Any, fds: list[int]) -> None:
    _whole(message.get("seq"), "listen: seq", 0, 2**62)
    family, addr, policy = message.get("family"), message.get("addr"), message.get("policy")
    if family not in FAMILIES or type(family) is not int:
        raise Invalid(f"listen: unknown address family {family!r}")
    if policy not in POLICIES:
        raise Invalid(f"listen: unknown scheduling policy {policy!r}")
    if family == socket.AF_UNIX:
        if type(addr) is not str or not addr or len(addr.encode(errors="replace")) > MAX_UNIX_PATH:
            raise Invalid(f"listen: a unix socket path must be text of 1 to {MAX_UNIX_PATH} bytes")
    elif type(addr) is not list or len(addr) != 2 or type(addr[0]) is not str or len(addr[0]) > 255:
        raise Invalid("listen: address must be [host, port]")
    else:
        _whole(addr[1], "listen: port", 0, 65535)
    backlog = message.get("backlog")
    if backlog is not None:
        _whole(backlog, "listen: backlog", 0, MAX_BACKLOG)
    _fds(fds, (0, 2))


_CHECKS: dict[str, Callable[[Any, list[int]], None]] = {
    "online": _no_fds, "leaving": _no_fds, "listening": _listening, "fatal": _fatal,
    "boot_error": _boot_error, "P": _pong, "x": _close, "listen": _listen, "M": _figures,
}


def check(name: str, message: Any, fds: list[int]) -> None:
    """Raise Invalid unless `message` has the shape of its kind `name`."""
    checker = _CHECKS.get(name)
    if checker is None:
        raise Invalid(f"unknown internal message {name!r}")
    checker(message, fds)
