"""Process-level helpers: signal names, exit codes, ending a process at once, parent-death signal."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PR_SET_PDEATHSIG = 1


def parse_signal(sig: str | int | signal.Signals) -> int:
    """A signal's number from its name ("SIGTERM", "TERM") or number; ValueError names a bad one."""
    if isinstance(sig, str):
        name = sig.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            raise ValueError(f"unknown signal {sig!r}") from None
    if isinstance(sig, int) and not isinstance(sig, bool) and int(sig) in signal.valid_signals():
        return int(sig)
    raise ValueError(f"unknown signal {sig!r}")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


def exit_code(exc: SystemExit) -> int:
    """The exit status `sys.exit(arg)` would give, printing a string argument as Python does."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    from . import _stdio

    _stdio.write(f"{code}\n")
    return 1


def exit_now(code: int) -> None:
    """End this process from any thread: flush stdio first, since os._exit skips it."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send `sig` when our parent dies (Linux); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def on_main_end(on_end: Callable[[], None], on_raise: Callable[..., bool | None]) -> None:
    """Learn when the main script's top level ends, and whether an uncaught exception ended it.

    `on_end` runs in the main thread at interpreter shutdown, before non-daemon threads are joined,
    so it may block to keep the process serving. `on_raise(type, value, tb)` may return True to
    keep Python from printing the traceback (a supervised worker sends it to the primary instead).
    """
    previous = sys.excepthook

    def excepthook(*args: Any) -> None:
        if not on_raise(*args):
            previous(*args)

    sys.excepthook = excepthook
    try:
        threading._register_atexit(on_end)  # type: ignore[attr-defined]
    except RuntimeError:  # shutdown has begun: the top level is over already
        on_end()
