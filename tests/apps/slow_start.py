"""An ASGI app whose import waits until the file named by $SLOW_START_GATE exists (30 s at most):
a test holds its workers in "starting" for as long as it likes, with no timing guess. GET /sleep?S
takes S seconds (a request in flight while the primary drains)."""

import asyncio
import os
import time

from tests.apps.lifespan import lifespan

_gate = os.environ.get("SLOW_START_GATE")
_deadline = time.monotonic() + 30
while _gate and not os.path.exists(_gate) and time.monotonic() < _deadline:
    time.sleep(0.05)


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    if scope["path"] == "/sleep":
        await asyncio.sleep(float(scope["query_string"] or b"1"))
    body = f"{os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
