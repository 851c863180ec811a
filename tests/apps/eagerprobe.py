"""Says how its first step ran: inside the protocol's data_received (an eager task start) or a loop turn
later, whether it is the current task, and, after waiting, that it still is. GET /wait sleeps first."""

import asyncio
import json
import sys


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    frame, inside = sys._getframe(1), False
    while frame is not None:
        inside = inside or frame.f_code.co_name == "data_received"
        frame = frame.f_back
    task = asyncio.current_task()
    if scope["path"] == "/wait":
        await asyncio.sleep(0.01)
    body = json.dumps({"eager": inside, "task": task is not None, "same": asyncio.current_task() is task,
                       "path": scope["path"]}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
