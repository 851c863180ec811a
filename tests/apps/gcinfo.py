"""Answers with the worker's garbage collector settings: `[enabled, gen0, gen1, gen2]` as JSON."""

import gc
import json


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = json.dumps([gc.isenabled(), *gc.get_threshold()]).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
