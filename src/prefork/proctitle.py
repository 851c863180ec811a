"""Process titles: `ps` shows `prefork: primary main:app` and `prefork: worker 3 main:app`.

With `--name api` (gunicorn's --name): `prefork: api primary main:app`, `prefork: api worker 3
main:app`, and kernel names `api-primary`, `api-w3`. The name goes after `prefork:` rather than
replacing the app as gunicorn's proc_name does: `pgrep -f 'prefork: api '` finds one server's
processes, `pgrep -f 'prefork: '` every prefork process, and the app is still shown. The primary
sets PREFORK_NAME (the option's own variable) once its options are resolved (cli/__init__.py), so
every process it starts, templates and workers, titles itself with the same name.

The full title (ps's args column, /proc/PID/cmdline) needs the optional `setproctitle` package
(`pip install 'prefork[proctitle]'`): it rewrites the memory argv lives in. Without it, or with
PREFORK_SETPROCTITLE=0, only the kernel's 15-character name (ps's comm column, top, /proc/PID/comm)
is set, through prctl(PR_SET_NAME); that short name is set in both cases: `prefork-primary`,
`prefork-w3`. Nothing here may fail a process: a title is a courtesy.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys

PR_SET_NAME = 15
ENV_DISABLE = "PREFORK_SETPROCTITLE"  # "0": do not use setproctitle even when it is installed
ENV_NAME = "PREFORK_NAME"  # --name, for this process and those it starts
COMM_MAX = 15  # the kernel keeps 16 bytes, the last one a NUL
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # cli/values.py's to_name checks the option


def use_name(name: str | None) -> None:
    """The server's --name, for the titles of this process and of every process started after."""
    if name:
        os.environ[ENV_NAME] = name


def name() -> str | None:
    """The server's name, or None (none given, or not one to_name would accept)."""
    value = os.environ.get(ENV_NAME, "").strip()
    return value if _NAME.fullmatch(value) else None


def short_name(short: str, server: str | None) -> str:
    """`prefork-w3` becomes `api-w3` for a server named api: its name cut, never the role."""
    if not server:
        return short
    role = short.removeprefix("prefork-")
    return f"{server[:max(1, COMM_MAX - len(role) - 1)]}-{role}"[:COMM_MAX]


def set_title(title: str, short: str) -> str:
    """`prefork: TITLE` (`prefork: NAME TITLE` with --name) as the process title and `short` as its
    kernel name; which way was used: "setproctitle", "prctl" or "" (neither could)."""
    how = ""
    server = name()
    short = short_name(short, server)
    if os.environ.get(ENV_DISABLE, "1") != "0":
        try:
            import setproctitle  # optional: prefork[proctitle]

            setproctitle.setproctitle(f"prefork: {server} {title}" if server else f"prefork: {title}")
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
