"""`--log-file PATH`: the whole pool writes its log to one file, reopened on SIGUSR1 (logrotate).

The primary opens the file and points its descriptors 1 and 2 at it (dup2), so every worker it
starts inherits them: one file, no relaying. logrotate moves the file away and sends SIGUSR1; the
supervisor then calls `on_reopen` on its loop thread (supervisor.py), which opens the path anew,
points 1 and 2 at the new file, and tells every worker to do the same through its channel (an
internal "reopen" message), since a worker's descriptors still point at the old file. A worker
reopens on its callback lane (`follow_reopen`), where the app's own code may run. The channel
rather than a signal: SIGUSR1's default action ends a process, and a worker that is still
starting (or a `prefork run` script with a handler of its own) must not be ended or disturbed by it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

MODE = 0o640  # logs hold paths and client addresses: not for every user of the machine


class LogFileError(Exception):
    """The file cannot be opened; the message is for a person."""


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, MODE)
    except FileNotFoundError:
        raise LogFileError(f"--log-file {path}: no such folder {os.path.dirname(path) or '.'}") from None
    except IsADirectoryError:
        raise LogFileError(f"--log-file {path}: is a folder, not a file") from None
    except PermissionError:
        raise LogFileError(f"--log-file {path}: permission denied (cannot write it)") from None
    except OSError as exc:
        raise LogFileError(f"--log-file {path}: {exc.strerror or exc}") from None


def point_stdio(path: str) -> None:
    """Open `path` for appending and make it this process's fds 1 and 2 (LogFileError if not)."""
    fd = _open(path)
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()  # what was written before goes to the old file
            except (OSError, ValueError):
                pass
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)


class Reopener:
    """The primary's watcher (supervisor.watchers): on SIGUSR1, reopen and tell the workers."""

    def __init__(self, path: str, primary: Any, log: Callable[[str], None]) -> None:
        self.path = path
        self.primary = primary
        self.log = log

    def on_reopen(self) -> None:
        try:
            point_stdio(self.path)
        except LogFileError as exc:  # keep writing to the old file, say why
            self.log(f"SIGUSR1: cannot reopen the log file: {exc}")
            return
        told = 0
        message = {"t": "reopen", "path": self.path}
        for worker in list(self.primary.workers.values()):
            try:
                if worker.is_connected() and worker._channel.send_internal(message):
                    told += 1
            except (OSError, ValueError):
                pass  # a worker on its way out: its replacement opens the new file
        self.log(f"SIGUSR1: reopened the log file {self.path} ({told} worker(s) told)")


def follow_reopen(path: str | None = None) -> bool:
    """In a worker: reopen the log file when the primary says so (`path` is the serve worker's own
    --log-file; the message names it too). False when this process is not a worker."""
    from . import _role

    child = _role.child
    if child is None:
        return False

    def on_reopen(message: Any, fds: list[int]) -> None:
        target = message.get("path") if isinstance(message, dict) else None
        target = target if isinstance(target, str) and target else path
        # on the callback lane, not the channel's reading thread: flushing sys.stdout may run the
        # app's own stream object (dispatch.py)
        child.dispatcher.post(reopen, target)

    child.internal["reopen"] = on_reopen
    return True


def reopen(path: str | None) -> None:
    """Reopen `path` as fds 1 and 2 (a worker's SIGUSR1 or the primary's message); never raises."""
    if path:
        try:
            point_stdio(path)
        except LogFileError as exc:
            print(f"prefork: cannot reopen the log file: {exc}", file=sys.stderr, flush=True)
