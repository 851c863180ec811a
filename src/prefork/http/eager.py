"""Each request's task starts eagerly on Python 3.12+: its first step runs at once, not a loop turn later.

uvicorn's protocol makes a task per request with `loop.create_task`: the app's first step waits for
the next turn of the loop, behind a scheduled callback, and a response ready at once (most are) still
costs the task's scheduling. Python 3.12's `asyncio.Task(..., eager_start=True)` runs the first step
inside the call, as the task (`asyncio.current_task()` is it, so anyio's cancel scopes hold); an app
that finishes without waiting never touches the ready queue. Measured in one process (uvloop, a
hello-world app, 64 connections, Python 3.13): 11.5-12.1 us of Python per request before, 9.5-10.0
after.

What changes for an app: its first step runs inside the protocol's `data_received`, before the
loop's other ready callbacks, as with `asyncio.eager_task_factory`, but only once the whole read is
parsed: a request whose body turns out malformed (a smuggling attempt) is refused with its 400 before
the app has answered it, as it was. A read that ends in a 400 starts its request the old way; so does
a request started from inside another eager start (a pipelined request that the previous response
releases), so starts never nest more than one deep. Python 3.10 and 3.11 have no eager tasks:
uvicorn's `create_task` stays.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from typing import Any

AVAILABLE = sys.version_info >= (3, 12)
_depth = [0]  # eager starts running now (one loop thread per worker)


def install(cls: Any, base: Any) -> bool:
    """Give `cls` (over uvicorn's httptools protocol `base`, with its data_received in place) the eager
    start, where Python has it."""
    if not AVAILABLE or not hasattr(base, "_start_asgi_task"):
        return False
    scheduled = base._start_asgi_task
    feed = cls.data_received

    def _start_asgi_task(self: Any, cycle: Any, app: Any) -> None:
        if _depth[0] or not isinstance(self.loop, asyncio.AbstractEventLoop):  # nested, or a stand-in
            scheduled(self, cycle, app)
        elif not self.feeding:  # a pipelined request that a scheduled task's response released
            _eager(self, cycle, app)
        elif self.pending is None:  # parsing: started once the whole read is parsed
            self.pending = (cycle, app)
        else:
            scheduled(self, cycle, app)

    def data_received(self: Any, data: bytes) -> None:
        self.feeding = True
        try:
            feed(self, data)
        finally:
            self.feeding = False
            pending, self.pending = self.pending, None
            if pending is not None:
                if self.transport.is_closing() or _depth[0]:  # refused (a 400): as before, nothing eager
                    scheduled(self, *pending)
                else:
                    _eager(self, *pending)

    cls.feeding = False
    cls.pending = None
    cls._start_asgi_task = _start_asgi_task
    cls.data_received = data_received
    return True


def _eager(protocol: Any, cycle: Any, app: Any) -> None:
    context = contextvars.Context() if getattr(protocol.config, "reset_contextvars", False) else None
    _depth[0] += 1
    try:
        task = asyncio.Task(cycle.run_asgi(app), loop=protocol.loop, context=context,  # type: ignore[call-arg]
                            eager_start=True)
    finally:
        _depth[0] -= 1
    if not task.done():  # it waits for something: tracked, as uvicorn tracks its tasks
        task.add_done_callback(protocol.tasks.discard)
        protocol.tasks.add(task)
