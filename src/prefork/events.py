"""A small, thread-safe event emitter with Node's names (`on`, `once`, `off`, `emit`).

Listeners are stored in a copy-on-write tuple so that `emit` (the hot path: every message) takes
no lock and a listener may add or remove listeners while it runs.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any



class _Once:
    """Wraps a `once` listener so that `off(event, fn)` still finds it by the original function."""

    __slots__ = ("fn", "emitter", "event")

    def __init__(self, emitter: EventEmitter, event: str, fn: Callable[..., Any]) -> None:
        self.fn, self.emitter, self.event = fn, emitter, event

    def __call__(self, *args: Any) -> Any:
        self.emitter.off(self.event, self)
        return self.fn(*args)


class EventEmitter:
    """Node-style emitter. A listener's exception is reported and the emitter lives on."""

    def __init__(self) -> None:
        self._listeners: dict[str, tuple[Callable[..., Any], ...]] = {}
        self._elock = threading.Lock()

    def on(self, event: str, fn: Callable[..., Any] | None = None) -> Any:
        """Add a listener; with no `fn`, work as a decorator."""
        if fn is None:
            def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
                self.on(event, f)
                return f
            return decorator
        if not callable(fn):
            raise TypeError(f"listener for {event!r} must be callable, not {type(fn).__name__}")
        with self._elock:
            self._listeners[event] = self._listeners.get(event, ()) + (fn,)
        self._listener_added(event)
        return self

    add_listener = on

    def once(self, event: str, fn: Callable[..., Any] | None = None) -> Any:
        if fn is None:
            def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
                self.once(event, f)
                return f
            return decorator
        return self.on(event, _Once(self, event, fn))

    def off(self, event: str, fn: Callable[..., Any] | None = None) -> Any:
        """Remove one listener (or all of `event` when `fn` is None)."""
        with self._elock:
            current = self._listeners.get(event, ())
            if fn is None:
                kept: tuple[Callable[..., Any], ...] = ()
            else:
                kept = current
                for i, f in enumerate(current):
                    if f is fn or (isinstance(f, _Once) and f.fn is fn):
                        kept = current[:i] + current[i + 1:]
                        break
            if kept:
                self._listeners[event] = kept
            else:
                self._listeners.pop(event, None)
        return self

    remove_listener = off

    def remove_all_listeners(self, event: str | None = None) -> Any:
        with self._elock:
            if event is None:
                self._listeners.clear()
            else:
                self._listeners.pop(event, None)
        return self

    def listeners(self, event: str) -> list[Callable[..., Any]]:
        return [f.fn if isinstance(f, _Once) else f for f in self._listeners.get(event, ())]

    def listener_count(self, event: str) -> int:
        return len(self._listeners.get(event, ()))

    def emit(self, event: str, *args: Any) -> bool:
        """Call each listener in order; return whether there was any (as Node does)."""
        fns = self._listeners.get(event)
        if not fns:
            return False
        for fn in fns:
            try:
                fn(*args)
            except SystemExit:
                raise
            except BaseException:
                report_callback_error(event)
        return True

    def _listener_added(self, event: str) -> None:
        """Hook for subclasses (a worker delivers messages held for its first listener)."""


def report_callback_error(what: str) -> None:
    """Print the current exception as Python would, so a bad listener is visible but not fatal.

    Never raises: the stream may be a closed pipe (then it is silenced, see _stdio.py), and the
    caller is a loop that must go on."""
    try:
        import traceback

        from . import _stdio

        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            _stdio.check()  # the callback's own write to a closed pipe: silence that stream
        _stdio.write(f"prefork: exception in {what!r} listener (process lives on):\n"
                     + traceback.format_exc())
    except BaseException:  # noqa: BLE001 - reporting must not be what ends the loop
        pass
