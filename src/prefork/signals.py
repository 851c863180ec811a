"""Signals in the primary: a handler only wakes the loop, and the loop runs the handling.

`signal.set_wakeup_fd` has the C-level handler write the signal's number to a socket at once, even
while the main thread is blocked in C code (Python-level handlers run only between the main
thread's bytecodes); the loop reads that socket and calls the handler registered for the signal
(`Supervisor.handle_hup`, ...). The Python-level handlers do nothing: they only have to exist, as
with SIG_DFL the kernel would act itself. Where the wake-up socket cannot be had (not the main
thread, or another owner such as an asyncio loop in the main thread), the Python-level handler
posts the signal to the loop instead, which is also only a wake-up.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from typing import Any


class Signals:
    """The primary's signal handling: one owner (the primary's loop), handlers by signal number."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.handlers: dict[int, Callable[[], None]] = {}
        self._sock: socket.socket | None = None  # our end of the wake-up socketpair
        self._wakeup: socket.socket | None = None

    def handle(self, handlers: dict[int, Callable[[], None]]) -> bool:
        """Route these signals to the loop (replacing earlier routes); False if this thread may
        not install handlers (only the main thread may)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        woken = self._wake_up_fd()
        for signum in handlers:
            signal.signal(signum, _noop if woken else self._post)
        self.handlers.update(handlers)
        return True

    def _wake_up_fd(self) -> bool:
        if self._sock is not None:
            return True
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        try:
            previous = signal.set_wakeup_fd(theirs.fileno(), warn_on_full_buffer=False)
        except ValueError:
            previous = None
        if previous != -1:  # not the main thread, or someone else's: leave theirs in place
            if previous is not None:
                signal.set_wakeup_fd(previous)
            ours.close()
            theirs.close()
            return False
        self._sock, self._wakeup = ours, theirs
        self.loop.call_soon(self.loop.add_reader, ours.fileno(), self._drain)
        return True

    def _post(self, signum: int, frame: Any) -> None:
        self.loop.call_soon(self._dispatch, signum)

    def _drain(self) -> None:
        """On the loop: every signal number the wake-up socket holds, in order."""
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            for signum in data:
                self._dispatch(signum)

    def _dispatch(self, signum: int) -> None:
        handler = self.handlers.get(signum)
        if handler is None:
            return
        try:
            handler()
        except SystemExit:
            raise
        except BaseException:
            from .events import report_callback_error

            report_callback_error(f"signal {signal.Signals(signum).name}")


def _noop(signum: int, frame: Any) -> None:
    """The Python-level handler when the wake-up socket carries the signal to the loop."""


def reset_in_child() -> None:
    """In a process forked from the primary: default handlers, no wake-up socket (its descriptor
    is closed there, and the number may be reused by anything)."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGTTIN, signal.SIGTTOU,
                   signal.SIGCHLD):  # SIGCHLD: routed to the loop in an init primary (reaper.py)
        signal.signal(signum, signal.SIG_DFL)
