"""One ordered thread for a worker's user callbacks (message listeners, posted callbacks).

The channel's reader thread must stay free to read: a `message` listener that calls `listen()`
waits for the primary's answer, which only the reader can read (a deadlock when listeners ran on
the reader). Callbacks run here one at a time, in the order they were posted, as Node runs them on
its one event loop. The queue is bounded: past MAX_QUEUED the reader waits (the primary's sends
then back up and its `send()` returns False), unless a call is waiting for an answer.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_QUEUED = 10_000


class Dispatcher:
    def __init__(self, run: Callable[..., None], may_block: Callable[[], bool]) -> None:
        self._run = run  # runs one callback, reporting its exception (never raises)
        self._may_block = may_block  # False while someone waits for an answer only the reader reads
        self._queue: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._cond:
            self._queue.append((fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="prefork-dispatch", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def post_from_reader(self, fn: Callable[..., Any], *args: Any) -> None:
        """As post(), but wait while the queue is full (back-pressure on the primary)."""
        with self._cond:
            while len(self._queue) >= MAX_QUEUED and self._may_block():
                self._cond.wait(0.1)
        self.post(fn, *args)

    def in_dispatcher(self) -> bool:
        return threading.current_thread() is self._thread

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until every posted callback has run (never from the dispatcher itself)."""
        if self.in_dispatcher():
            return False
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def _serve(self) -> None:
        queue, cond = self._queue, self._cond
        while True:
            with cond:
                self._busy = False
                cond.notify_all()
                while not queue:
                    cond.wait()
                fn, args = queue.popleft()
                self._busy = True
            self._run(fn, *args)
