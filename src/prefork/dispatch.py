"""A worker's two channel threads: one reads the channel, user callbacks run in order, never stuck.

Two jobs: reading the channel (prefork's internal messages are handled as they are read), and
running user callbacks (`message` listeners, posted callbacks) one at a time, in order, as Node
runs them on its one event loop. Two threads share them. Whichever thread is free takes the next
callback, else the reading if nobody reads, else waits. So in the common case the thread that read
a message runs its listener at once (no hand-over between threads, which would cost a wake-up per
message), and while a callback runs, the other thread reads: a listener that calls `listen()` gets
the primary's answer (its call wakes the other thread at once), and one that runs long does not keep
heartbeats and replies unread for longer than POLL.

The queue of callbacks is bounded: past MAX_QUEUED the reading thread waits (the primary's sends
then back up and its `send()` returns False), unless a call waits for an answer only a reader reads.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_QUEUED = 10_000
RUN_BATCH = 256  # callbacks one turn takes at most
POLL = 0.01  # how soon a callback that runs long gets the other thread reading in its place
IDLE_POLLS = 10  # polls in a row that found nothing to do: then sleep until woken (an idle worker)


class Dispatcher:
    def __init__(self, read: Callable[[], list[Any]], on_batch: Callable[[list[Any]], list[Any] | None],
                 on_closed: Callable[[BaseException], None], run: Callable[..., None],
                 may_block: Callable[[], bool]) -> None:
        self._read = read  # one batch from the channel (blocking); raises when it closes
        self._on_batch = on_batch  # handles internal messages, returns the user ones' callbacks
        self._on_closed = on_closed
        self._run = run  # runs one callback, reporting its exception (never raises)
        self._may_block = may_block  # False while someone waits for an answer only a reader reads
        self._queue: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._lock = threading.Lock()  # taken directly on the per-message path (Condition's with is Python)
        self._cond = threading.Condition(self._lock)
        self._reading = False
        self._eof = False
        self._runner: threading.Thread | None = None  # the thread running a callback now
        self._asleep = False  # the idle thread waits without POLL: wake it when nobody would read

    def start(self) -> None:
        for name in ("prefork-channel", "prefork-channel-2"):
            threading.Thread(target=self._serve, name=name, daemon=True).start()

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` after every callback posted before it (from any thread)."""
        with self._cond:
            self._queue.append((fn, args))
            self._cond.notify_all()  # not one: a wait_idle() caller may be waiting beside a thread asleep

    def need_reader(self) -> None:
        """A call waits for the primary's answer: make sure a thread reads (the other one)."""
        with self._cond:
            self._cond.notify_all()

    def in_callback(self) -> bool:
        return threading.current_thread() is self._runner

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until every posted callback has run (never from inside one)."""
        if self.in_callback():
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._runner is not None:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                self._cond.wait(POLL)
            return True

    def _serve(self) -> None:
        """One of the two threads. Each turn ends its last job and picks the next in one critical
        section (a lock taken once per job: this is every message's path)."""
        cond, lock, queue = self._cond, self._lock, self._queue
        me = threading.current_thread()
        job, calls = "", None
        idle = 0  # this thread's polls in a row that found nothing to do
        while True:
            with lock:
                if job == "run":
                    self._runner = None
                elif job == "read":
                    if calls:
                        while len(queue) >= MAX_QUEUED and self._may_block():
                            cond.wait(0.1)  # back-pressure: the callbacks are behind
                        queue.extend(calls)
                    self._reading = False
                while True:
                    if queue and self._runner is None:
                        # every callback waiting, in order: one lock for a batch of messages
                        if len(queue) <= RUN_BATCH:
                            todo = list(queue)
                            queue.clear()
                        else:
                            todo = [queue.popleft() for _ in range(RUN_BATCH)]
                        self._runner = me
                        job, idle = "run", 0
                        if self._asleep and not self._reading:
                            cond.notify_all()  # the other thread sleeps for good: it reads now
                        break
                    if not self._reading and not self._eof:
                        self._reading = True
                        job, idle = "read", 0
                        break
                    # Nothing for this thread. The other one may start a callback that runs long
                    # while nobody reads: look again every POLL (a wake-up per message would cost
                    # more than the message). After IDLE_POLLS empty looks, sleep until woken: an
                    # idle worker's thread would otherwise wake 100 times a second for nothing,
                    # each time taking the GIL from the serving loop.
                    if self._eof:
                        cond.wait()
                    elif idle >= IDLE_POLLS:
                        self._asleep = True
                        cond.wait()
                        self._asleep = False
                    elif not cond.wait(POLL):
                        idle += 1
            if job == "run":
                for fn, args in todo:
                    self._run(fn, *args)
            else:
                calls = self._read_once()

    def _read_once(self) -> list[tuple[Callable[..., Any], tuple[Any, ...]]] | None:
        """One batch: internal messages are handled now, still by the only reader (so they stay in
        order); the user callbacks it brings are returned, for the queue."""
        try:
            batch = self._read()
        except BaseException as exc:  # the channel closed (or the primary sent garbage)
            with self._cond:
                self._eof = True
                self._cond.notify_all()
            self._on_closed(exc)
            return None
        try:
            return self._on_batch(batch)
        except Exception:  # a bug here must not cost the worker its channel threads
            from .events import report_callback_error

            report_callback_error("the channel's messages")
            return None
