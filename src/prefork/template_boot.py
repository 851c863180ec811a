"""A template process of its own (versions.py): `python -m prefork.template_boot`.

The primary starts it, for `serve --preload`, as a fresh interpreter per code version. It imports
what PREFORK_TEMPLATE_ENTRY names ("module:function"), a function that imports the app and returns
what each worker runs; it tells the primary whether that worked, then forks a worker per request
(template.py's loop) until the primary goes, or until it is retired and its last worker has exited.

Messages on the SOCK_SEQPACKET socket PREFORK_TEMPLATE_FD, after template.py's:
    template -> primary, once: {"ready": {...}} or {"error": one line, "traceback": text}
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys
import traceback

ENV_FD, ENV_ENTRY, ENV_PARENT = "PREFORK_TEMPLATE_FD", "PREFORK_TEMPLATE_ENTRY", "PREFORK_TEMPLATE_PARENT"
ENV_SPARE = "PREFORK_TEMPLATE_SPARE"


def main() -> int:
    from . import _proc

    # the primary's death ends us (and so our workers: their parent is gone); set before the import,
    # which may take seconds, so a primary that dies meanwhile leaves nothing behind
    _proc.set_parent_death_signal(signal.SIGKILL)
    parent = int(os.environ.pop(ENV_PARENT))
    if os.getppid() != parent:
        return 1
    sock = socket.socket(fileno=int(os.environ.pop(ENV_FD)))
    entry = os.environ.pop(ENV_ENTRY)
    os.environ.pop("PREFORK_HOOKS", None)  # the workers' (their fork requests carry it), not the app's
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the primary's to handle
    if os.environ.pop(ENV_SPARE, "") == "1" and not _wait_as_spare(sock, entry):
        return 0
    try:
        module, _, name = entry.partition(":")
        target, info = getattr(importlib.import_module(module), name)()
    except BaseException as exc:  # SystemExit from an app's import too: the primary says why, once
        line = str(exc) if getattr(exc, "one_line", False) else f"{type(exc).__name__}: {exc}"
        # the app's own error, not prefork's wrapping of it (http/preload.py's ImportFailed)
        cause = exc.__cause__ if getattr(exc, "one_line", False) and exc.__cause__ else exc
        details = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
        _send(sock, {"error": line[:4000], "traceback": details[-16384:]})  # within one datagram
        return 1
    sys.stdout.flush()
    sys.stderr.flush()
    keep = _open_fds() - {sock.fileno()}  # what the app opened at import: its workers keep these
    threads = _threads()
    if threads > 1:  # forking now could hand a worker a lock held for good: the primary won't use us
        import threading

        info["threads"] = [t.name for t in threading.enumerate() if t is not threading.main_thread()] \
            or [f"{threads - 1} thread(s) not started by the threading module"]
    peers = _connections(keep)
    if peers:
        info["connections"] = peers
    _send(sock, {"ready": info})
    from .template import _serve

    return _serve(sock, target, keep, parent)


def _wait_as_spare(sock: socket.socket, entry: str) -> bool:
    """A spare (versions.py): import the serving machinery now, say so, then wait for the primary's
    "go" (a reload) to import the app; False when the primary closes instead."""
    started_in = os.getcwd()  # the folder as resolved at our start: a deploy may remove it later
    module = importlib.import_module(entry.partition(":")[0])
    warm = getattr(module, "warm_machinery", None)
    if warm is not None:
        warm()
    _send(sock, {"spare": True})
    try:
        data = sock.recv(1 << 16)
        go = json.loads(data)["go"] if data else None
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(go, dict):
        return False
    cwd = go.get("cwd")
    if isinstance(cwd, str):
        os.chdir(cwd)  # as given: a `current` symlink swapped since we started is followed now
        sys.path[:] = [cwd if p in (started_in, "") else p for p in sys.path]
    return True


def _send(sock: socket.socket, message: dict) -> None:
    try:
        sock.send(json.dumps(message).encode())
    except OSError:
        pass


def _connections(fds: set[int]) -> list[str]:
    """The peers of the connected sockets the app opened at import (a database's, say): every
    forked worker would share each one, and their bytes would interleave."""
    peers = []
    for fd in sorted(fds - {0, 1, 2}):
        try:
            copy = os.dup(fd)
        except OSError:
            continue
        try:
            probe = socket.socket(fileno=copy)
        except OSError:
            os.close(copy)
            continue  # not a socket
        try:
            if probe.type == socket.SOCK_STREAM:
                peer = probe.getpeername()
                peers.append(peer if isinstance(peer, str) else f"{peer[0]}:{peer[1]}")
        except OSError:
            pass  # not connected (a listening socket, say)
        finally:
            probe.close()
    return peers[:10]


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def _open_fds() -> set[int]:
    try:
        return {int(name) for name in os.listdir("/proc/self/fd")}
    except OSError:
        return {0, 1, 2}


if __name__ == "__main__":
    from . import _proc

    _proc.exit_now(main())
