"""Writing to stdout/stderr without ever failing: a closed log pipe must not end a loop.

A log shipper that restarts, or `prefork serve ... | head`, closes the read end of our stdout or
stderr; every later write then raises BrokenPipeError (Python ignores SIGPIPE). Such a stream is
pointed at /dev/null (dup2 over its descriptor, so buffered data, tracebacks, faulthandler and
workers started later all go there too) and the process keeps serving.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO


def write(text: str, stream: TextIO | None = None) -> bool:
    """Write and flush `text` (to stderr by default); False if the stream is gone (now silenced)."""
    out = stream if stream is not None else sys.stderr
    if out is None:
        return False
    try:
        out.write(text)
        out.flush()
        return True
    except (OSError, ValueError):
        silence(out)
        return False


def silence(stream: TextIO | None) -> None:
    """Point a broken stream's descriptor at /dev/null; what it buffered is flushed there."""
    if stream is None:
        return
    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.dup2(null, fd, inheritable=fd <= 2)
        finally:
            os.close(null)
    except (OSError, ValueError, AttributeError):
        return
    try:
        stream.flush()
    except (OSError, ValueError):
        pass


def check() -> None:
    """After a callback failed with an OSError: silence stdout or stderr if that was the cause."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            silence(stream)
