"""A raw ASGI app for the systemd and PID 1 tests (tests/test_systemd.py, tests/test_pid1.py).

- `/`: hello;
- `/env`: the variables systemd meant for the primary alone that this worker can see (JSON);
- `/orphan`: runs `sh -c "sleep S &"` and returns at once: the shell exits, and its `sleep` child is
  orphaned, so it reparents to the nearest subreaper or PID 1, which must reap it (no zombie);
- lifespan startup waits APP_START_DELAY seconds (a slow app, to see what happens before ready).
"""

import asyncio
import json
import os
import subprocess

MANAGER_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                "WATCHDOG_PID")


async def _reply(send, body: bytes, content_type: bytes = b"text/plain") -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.sleep(float(os.environ.get("APP_START_DELAY", "0")))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path == "/env":
        seen = {k: os.environ[k] for k in MANAGER_VARS if k in os.environ}
        await _reply(send, json.dumps({"pid": os.getpid(), "vars": seen}).encode(), b"application/json")
    elif path == "/orphan":
        seconds = (scope.get("query_string") or b"s=0.2").decode().partition("=")[2] or "0.2"
        shell = subprocess.Popen(["sh", "-c", f"sleep {float(seconds)} >/dev/null 2>&1 & echo $!"],
                                 stdout=subprocess.PIPE)
        out, _ = shell.communicate()  # the shell is our child and reaped here; its sleep is not
        await _reply(send, out.strip() or b"?")
    else:
        await _reply(send, f"hello from {os.getpid()}\n".encode())
