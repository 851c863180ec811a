"""The keep-alive timeout over uvicorn's httptools protocol with one timer per idle period, not per request.

uvicorn arms a timer (`loop.call_later`) when each response completes and cancels it when the next
request's bytes arrive: a timer made and a timer cancelled per request, each a heap operation in
libuv. With 2,000 keep-alive clients that was 7-8 % of a worker's samples (py-spy, hello world).

Here a response that completes records when the connection went idle (`idle_at`), and arms the timer
only if none is armed; arriving bytes mark the connection busy (`idle_at = None`), cancelling nothing.
When the timer fires:
- idle since it was armed (the same `idle_at`): the connection closes, as uvicorn's would;
- idle since later: it is armed again for what is left of the timeout;
- busy: it is dropped, and the end of that request arms a new one.
So a connection still closes `--keep-alive` seconds after its last response, never sooner, and later
only by the timer's own lateness. uvicorn's `timeout_keep_alive_handler` does the closing.
"""

from __future__ import annotations

import time
from typing import Any

_NEEDED = ("on_response_complete", "timeout_keep_alive_handler", "_unset_keepalive_if_required",
           "_start_asgi_task")


def install(cls: Any, base: Any) -> bool:
    """Give `cls` (over uvicorn's httptools protocol `base`) this timer. False (nothing done) over a
    uvicorn whose protocol changed shape; its own per-request timer stays then."""
    if not all(hasattr(base, name) for name in _NEEDED):
        return False
    clock = time.monotonic

    def on_response_complete(self: Any) -> None:
        """uvicorn's, but the keep-alive timer is armed only when none is."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:  # a pipelined request waits: start it (the connection is not idle)
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self.idle_at = clock()
        if self.timeout_keep_alive_task is None:
            self.armed_at = self.idle_at
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.keep_alive_due)

    def keep_alive_due(self: Any) -> None:
        self.timeout_keep_alive_task = None
        idle_at = self.idle_at
        if idle_at is None or self.transport.is_closing():  # busy: its response re-arms
            return
        if idle_at == self.armed_at:  # nothing came since the timer was armed: the whole timeout idle
            self.timeout_keep_alive_handler()
            return
        self.armed_at = idle_at
        left = max(0.0, self.timeout_keep_alive - (clock() - idle_at))
        self.timeout_keep_alive_task = self.loop.call_later(left, self.keep_alive_due)

    cls.idle_at = None
    cls.armed_at = None
    cls.on_response_complete = on_response_complete
    cls.keep_alive_due = keep_alive_due
    return True

