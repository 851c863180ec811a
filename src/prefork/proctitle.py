"""Process titles: `ps` shows `prefork: primary main:app` and `prefork: worker 3 main:app`.

The full title (ps's args column, /proc/PID/cmdline) needs the optional `setproctitle` package
(`pip install 'prefork[proctitle]'`): it rewrites the memory argv lives in. Without it, or with
PREFORK_SETPROCTITLE=0, only the kernel's 15-character name (ps's comm column, top, /proc/PID/comm)
is set, through prctl(PR_SET_NAME); that short name is set in both cases: `prefork-primary`,
`prefork-w3`. Nothing here may fail a process: a title is a courtesy.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_NAME = 15
ENV_DISABLE = "PREFORK_SETPROCTITLE"  # "0": do not use setproctitle even when it is installed
COMM_MAX = 15  # the kernel keeps 16 bytes, the last one a NUL


def set_title(title: str, short: str) -> str:
    """`prefork: TITLE` as the process title and `short` as its kernel name; which way was used:
    "setproctitle", "prctl" or "" (neither could)."""
    how = ""
    if os.environ.get(ENV_DISABLE, "1") != "0":
        try:
            import setproctitle  # optional: prefork[proctitle]

            setproctitle.setproctitle(f"prefork: {title}")
            how = "setproctitle"
        except Exception:  # missing, or a platform where it cannot
            pass
    if set_comm(short) and not how:
        how = "prctl"
    return how


def set_comm(name: str) -> bool:
    """The kernel's name of this thread (the main thread's is the process's comm)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        raw = name.encode("utf-8", "replace")[:COMM_MAX]
        return bool(libc.prctl(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False
