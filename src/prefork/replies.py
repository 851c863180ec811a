"""Calls from a worker that wait for the primary's answer (`listen()`), by sequence number.

The answer is turned into its result on the channel's reader thread, before the next frame is
read: a listener must be registered before the connections the primary sends right after it. A
call never waits forever: it ends with an error when the channel closes.
"""

from __future__ import annotations

import errno
import itertools
import threading
from collections.abc import Callable

from .channel import close_fds

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Requests:
    def __init__(self, need_reader: Callable[[], None] = lambda: None) -> None:
        self._need_reader = need_reader  # a caller may be the thread that would read the answer
        self.waiting: dict[int, list[Any]] = {}
        self.builders: dict[int, Callable[[dict[str, Any], list[int]], Any]] = {}
        self.cond = threading.Condition()
        self._seq = itertools.count(1)

    def pending(self) -> bool:
        return bool(self.waiting)

    def answer(self, message: dict[str, Any], fds: list[int]) -> None:
        with self.cond:
            slot = self.waiting.get(message.get("seq"))  # type: ignore[arg-type]
            build = self.builders.pop(message.get("seq"), None)  # type: ignore[arg-type]
        if slot is None or build is None:
            close_fds(fds)
            return
        try:
            result: Any = (build(message, fds), None)
        except Exception as exc:
            result = (None, exc)
        with self.cond:
            slot.append(result)
            self.cond.notify_all()

    def ask(self, channel: Any, request: dict[str, Any], build: Callable[[dict[str, Any], list[int]], Any],
            fds: list[int] | None = None) -> Any:
        seq = request["seq"] = next(self._seq)
        with self.cond:
            self.waiting[seq] = slot = []
            self.builders[seq] = build
        try:
            channel.send_internal(request, fds or ())
            self._need_reader()
            with self.cond:
                while not slot:
                    if channel.closed:
                        raise OSError(errno.ENOTCONN, "the channel to the primary is closed")
                    self.cond.wait(0.5)
        finally:
            with self.cond:
                self.waiting.pop(seq, None)
                self.builders.pop(seq, None)
        value, error = slot[0]
        if error is not None:
            raise error
        return value

    def closed(self) -> None:
        """The channel closed: wake every waiting call (it sees the closed channel)."""
        with self.cond:
            self.cond.notify_all()
