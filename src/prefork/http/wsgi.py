"""WSGI apps under `prefork serve`: a small bridge in front of the same uvicorn path the ASGI apps use.

Why not a2wsgi's WSGIMiddleware as it is: it hops between the app's thread and the event loop for
every message (start, each body chunk, the end), and each hop is a `run_coroutine_threadsafe` plus
a blocking wait. Measured here it made short responses slower than gunicorn's gthread worker on
new connections. This bridge does one hop per request in the common case:

- the request body is read on the loop first (kept in memory, spooled to disk past 1 MiB), so the
  app's `wsgi.input` never waits for the loop;
- the app runs in a thread pool (`--threads`, per worker); the response is gathered in that
  thread, and if it ends within 256 KiB the whole response goes back to the loop at once;
- bigger or streamed responses (and `write()`) switch to streaming, one blocking hand-over per
  chunk, which is what keeps memory flat and gives back-pressure.
"""

from __future__ import annotations

import asyncio
import io
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SPOOL_AT = 1 << 20
GATHER_UP_TO = 256 << 10


class WSGIBridge:
    """An ASGI3 app that runs the WSGI `app` in `threads` threads."""

    def __init__(self, app: Any, threads: int) -> None:
        self.app = app
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsgi")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    self.executor.shutdown(wait=False)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1000})

    async def _http(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        if not message.get("more_body", False):  # the usual case: the whole body in one message
            body: Any = io.BytesIO(message.get("body", b""))
        else:
            body = tempfile.SpooledTemporaryFile(max_size=SPOOL_AT)
            while True:
                body.write(message.get("body", b""))
                if not message.get("more_body", False):
                    break
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
            body.seek(0)
        loop = asyncio.get_running_loop()
        call = _Call(self.app, environ(scope, body), loop, send)
        try:
            result = await loop.run_in_executor(self.executor, call.run)
        finally:
            body.close()
        if result is not None:  # gathered: the whole response in one go
            status, headers, data = result
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": data})


class _Call:
    """One request, run in a pool thread."""

    def __init__(self, app: Any, environ: dict[str, Any], loop: asyncio.AbstractEventLoop, send: Any) -> None:
        self.app = app
        self.environ = environ
        self.loop = loop
        self.send = send
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.streaming = False
        self.started = False

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if exc_info is not None and self.started:
            raise exc_info[1].with_traceback(exc_info[2])
        self.status = int(status.split(" ", 1)[0])
        self.headers = [(k.strip().lower().encode("latin-1"), v.strip().encode("latin-1"))
                        for k, v in headers]
        return self.write

    def _hand_over(self, message: dict[str, Any]) -> None:
        asyncio.run_coroutine_threadsafe(self.send(message), self.loop).result()

    def _start_streaming(self, first: bytes) -> None:
        self.streaming = self.started = True
        self._hand_over({"type": "http.response.start", "status": self.status, "headers": self.headers})
        if first:
            self._hand_over({"type": "http.response.body", "body": first, "more_body": True})

    def write(self, data: bytes) -> None:
        """The legacy `write()` of start_response: always streams."""
        if not self.streaming:
            self._start_streaming(b"")
        if data:
            self._hand_over({"type": "http.response.body", "body": data, "more_body": True})

    def run(self) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        iterable = self.app(self.environ, self.start_response)
        try:
            parts: list[bytes] = []
            size = 0
            for chunk in iterable:
                if self.streaming:
                    if chunk:
                        self._hand_over({"type": "http.response.body", "body": chunk, "more_body": True})
                    continue
                parts.append(chunk)
                size += len(chunk)
                if size > GATHER_UP_TO:
                    self._start_streaming(b"".join(parts))
                    parts = []
            if self.streaming:
                self._hand_over({"type": "http.response.body", "body": b""})
                return None
            self.started = True
            return self.status, self.headers, b"".join(parts)
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()


def environ(scope: Any, body: Any) -> dict[str, Any]:
    """PEP 3333's environ from an ASGI HTTP scope (strings are bytes-as-latin-1, as WSGI wants)."""
    root_path = scope.get("root_path", "")
    path = scope["path"]
    if root_path and path.startswith(root_path):
        path = path[len(root_path):]
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    env: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": root_path.encode("utf-8").decode("latin-1"),
        "PATH_INFO": path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1] if server[1] is not None else 80),
        "REMOTE_ADDR": client[0],
        "REMOTE_PORT": str(client[1]),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for name, value in scope.get("headers", ()):
        key = name.decode("latin-1").upper().replace("-", "_")
        text = value.decode("latin-1")
        if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
            env[key] = text
            continue
        key = "HTTP_" + key
        env[key] = env[key] + "," + text if key in env else text
    return env


def wrap_wsgi(app: Any, threads: int) -> Any:
    """An ASGI app that runs the WSGI `app` in `threads` threads."""
    return WSGIBridge(app, threads)
