"""The primary's event loop: one thread owns all worker state, fds, timers and queued calls.

Everything that touches the primary's state runs here, one callback at a time. Other threads (the
main thread running the user's script, signal handlers, timers) hand work over with `call_soon`,
which wakes the loop through an eventfd.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

from ._proc import exit_code
from .events import report_callback_error


class TimerHandle:
    __slots__ = ("when", "fn", "args", "cancelled")

    def __init__(self, when: float, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when, self.fn, self.args, self.cancelled = when, fn, args, False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """A selector loop with thread-safe `call_soon`, timers and fd callbacks."""

    def __init__(self, on_exit_request: Callable[[int], None]) -> None:
        self.selector = selectors.DefaultSelector()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.selector.register(self._wake_fd, selectors.EVENT_READ, (self._drain_wake, None))
        self._calls: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._woken = False
        self.thread: threading.Thread | None = None
        self.stopping = False
        self._on_exit_request = on_exit_request

    # -- from any thread -------------------------------------------------------------------------

    def in_loop(self) -> bool:
        return threading.current_thread() is self.thread

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self._calls.append((fn, args))
        if not self._woken and not self.in_loop():
            self._woken = True
            os.eventfd_write(self._wake_fd, 1)

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> TimerHandle:
        handle = TimerHandle(time.monotonic() + delay, fn, args)
        self.call_soon(self._add_timer, handle)
        return handle

    def run_sync(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """Run `fn` on the loop thread and return its result (or raise its exception) here."""
        if self.in_loop() or self.thread is None:
            return fn(*args)
        done = threading.Event()
        box: list[Any] = [None, None]

        def call() -> None:
            try:
                box[0] = fn(*args)
            except BaseException as exc:
                box[1] = exc
            done.set()

        self.call_soon(call)
        if not done.wait(timeout):
            raise TimeoutError(f"the primary's loop did not run {getattr(fn, '__name__', fn)}")
        if box[1] is not None:
            raise box[1]
        return box[0]

    # -- on the loop thread ----------------------------------------------------------------------

    def _add_timer(self, handle: TimerHandle) -> None:
        heapq.heappush(self._timers, (handle.when, next(self._seq), handle))

    def add_reader(self, fd: int, callback: Callable[[], Any]) -> None:
        self._set(fd, 0, callback)

    def remove_reader(self, fd: int) -> None:
        self._set(fd, 0, None)

    def add_writer(self, fd: int, callback: Callable[[], Any]) -> None:
        self._set(fd, 1, callback)

    def remove_writer(self, fd: int) -> None:
        self._set(fd, 1, None)

    def _set(self, fd: int, slot: int, callback: Callable[[], Any] | None) -> None:
        try:
            key = self.selector.get_key(fd)
            pair = list(key.data)
        except KeyError:
            key, pair = None, [None, None]
        pair[slot] = callback
        events = (selectors.EVENT_READ if pair[0] else 0) | (selectors.EVENT_WRITE if pair[1] else 0)
        if key is None:
            if events:
                self.selector.register(fd, events, tuple(pair))
        elif events:
            self.selector.modify(fd, events, tuple(pair))
        else:
            self.selector.unregister(fd)

    def _drain_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass

    def has_pending(self) -> bool:
        """Whether calls wait to run (a callback that would rather go on polling yields to them)."""
        return bool(self._calls)

    def _timeout(self) -> float | None:
        if self._calls:
            return 0
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def run_forever(self) -> None:
        select = self.selector.select
        while not self.stopping:
            self._woken = False
            for key, mask in select(self._timeout()):
                reader, writer = key.data
                if mask & selectors.EVENT_READ and reader is not None:
                    self._guard(reader, ())
                if mask & selectors.EVENT_WRITE and writer is not None:
                    self._guard(writer, ())
            self._run_calls()
            self._run_timers()

    def _run_calls(self) -> None:
        calls = self._calls
        for _ in range(len(calls)):
            fn, args = calls.popleft()
            self._guard(fn, args)

    def _run_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            handle = heapq.heappop(timers)[2]
            if not handle.cancelled:
                self._guard(handle.fn, handle.args)

    def _guard(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Run one callback; a user's exception is reported, `sys.exit` ends the primary. Nothing
        raised here, by the callback or by the report of it, may end the loop."""
        try:
            fn(*args)
        except SystemExit as exc:
            self._on_exit_request(exit_code(exc))
        except BaseException:
            report_callback_error(getattr(fn, "__qualname__", repr(fn)))
