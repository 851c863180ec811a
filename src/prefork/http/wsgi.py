"""WSGI apps under `prefork serve`: a small bridge in front of the same uvicorn path the ASGI apps use.

Why not a2wsgi's WSGIMiddleware as it is: it hops between the app's thread and the event loop for
every message (start, each body chunk, the end), and each hop is a `run_coroutine_threadsafe` plus
a blocking wait. Measured here it made short responses slower than gunicorn's gthread worker on
new connections. This bridge does one hop per request in the common case:

- the request body is read on the loop first (kept in memory, spooled to disk past 1 MiB), so the
  app's `wsgi.input` never waits for the loop;
- the app runs in a thread pool (`--threads`, per worker; see _Pool for how threads are woken);
  the response is gathered in that thread, and if it ends within 256 KiB the whole response goes
  back to the loop at once, with one call_soon_threadsafe that resolves the request's future;
- bigger or streamed responses (and `write()`) switch to streaming, one blocking hand-over per
  chunk, which is what keeps memory flat and gives back-pressure.
"""

from __future__ import annotations

import asyncio
import collections
import io
import sys
import tempfile
import threading
from typing import Any

SPOOL_AT = 1 << 20
GATHER_UP_TO = 256 << 10


class WSGIBridge:
    """An ASGI3 app that runs the WSGI `app` in `threads` threads."""

    def __init__(self, app: Any, threads: int, header_map: str = "drop") -> None:
        self.app = app
        self.pool = _Pool(threads)
        self.header_map = header_map

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
                    self.pool.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1000})

    async def _http(self, scope: Any, receive: Any, send: Any) -> None:
        if self.header_map == "refuse" and any(b"_" in name for name, _ in scope.get("headers", ())):
            await _refuse(send)
            return
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
        done = loop.create_future()
        self.pool.submit(_Call(self.app, environ(scope, body, self.header_map), loop, send, done))
        try:
            result = await done
        finally:
            body.close()
        if result is not None:  # gathered: the whole response in one go
            status, headers, data = result
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": data})


class _Pool:
    """`threads` threads running the requests, woken sparingly.

    Why not ThreadPoolExecutor + run_in_executor: that wraps every call in a concurrent Future, a
    work item and an asyncio future chained to it, and wakes one thread per request. Each wake-up
    of a thread costs more than the hand-off itself: uvloop releases the GIL around every callback,
    so a woken thread takes the GIL from the loop between callbacks, and the two ping-pong.

    Here the requests of one loop turn are queued, and at the end of the turn (call_soon) one
    sleeping thread is woken, only if none is running already; a running thread takes the queued
    requests one after the other in a single stretch. So a blocking app still gets its concurrency:
    when queued requests wait and no request was taken for STALL seconds (the running threads are
    blocked in the app), every waiting request gets a thread, up to `threads`.
    """

    STALL = 0.001

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.pending: collections.deque[Any] = collections.deque()
        self.lock = threading.Lock()
        self.sleeping: list[threading.Lock] = []
        self.active = 0
        self.threads = 0
        self.taken = 0
        self.mark = 0
        self.checking = False
        self.closed = False
        self.flushing = False

    def submit(self, call: Any) -> None:
        with self.lock:
            self.pending.append(call)
        if not self.flushing:
            self.flushing = True
            call.loop.call_soon(self._flush, call.loop)

    def _flush(self, loop: Any) -> None:
        """Once per loop turn: the requests of the turn go to the threads with one wake-up."""
        self.flushing = False
        waiter = None
        start = False
        with self.lock:
            if not self.pending:
                return
            if not self.active:
                if self.sleeping:
                    waiter = self.sleeping.pop()
                    self.active += 1
                elif self.threads < self.size:
                    start = True
                    self.threads += 1
                    self.active += 1
            elif not self.checking:
                self.checking = True
                self.mark = self.taken
                loop.call_later(self.STALL, self._check, loop)
        if waiter is not None:
            waiter.release()
        elif start:
            self._start()

    def _start(self) -> None:
        waiter = threading.Lock()
        waiter.acquire()
        threading.Thread(target=self._work, args=(waiter,), name=f"wsgi_{self.threads}", daemon=True).start()

    def _check(self, loop: Any) -> None:
        wake = []
        start = 0
        with self.lock:
            self.checking = False
            if not self.pending or self.closed:
                return
            if self.taken != self.mark:  # the running threads take requests: look again later
                self.checking = True
                self.mark = self.taken
                loop.call_later(self.STALL, self._check, loop)
                return
            n = len(self.pending)  # stalled (blocking apps): every waiting request gets a thread
            while n and self.sleeping:
                wake.append(self.sleeping.pop())
                self.active += 1
                n -= 1
            start = min(n, self.size - self.threads)
            self.threads += start
            self.active += start
        for waiter in wake:
            waiter.release()
        for _ in range(start):
            self._start()

    def _work(self, waiter: threading.Lock) -> None:
        lock, pending = self.lock, self.pending
        while True:
            with lock:
                if pending:
                    call = pending.popleft()
                    self.taken += 1
                elif self.closed:
                    self.active -= 1
                    self.threads -= 1
                    return
                else:
                    self.active -= 1
                    self.sleeping.append(waiter)
                    call = None
            if call is None:
                waiter.acquire()
                continue
            call()

    def shutdown(self) -> None:
        with self.lock:
            self.closed = True
            wake, self.sleeping = self.sleeping, []
            self.active += len(wake)
        for waiter in wake:
            waiter.release()


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the request's task was cancelled (shutdown timeout) while the app ran
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class _Call:
    """One request, run in a pool thread."""

    def __init__(
        self, app: Any, environ: dict[str, Any], loop: asyncio.AbstractEventLoop, send: Any, done: Any
    ) -> None:
        self.app = app
        self.environ = environ
        self.loop = loop
        self.send = send
        self.done = done
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

    def __call__(self) -> None:
        error: BaseException | None = None
        try:
            result = self.run()
        except BaseException as exc:  # noqa: B036 -- it goes to the request's task, as run_in_executor did
            result, error = None, exc
        try:
            self.loop.call_soon_threadsafe(_resolve, self.done, result, error)
        except RuntimeError:  # the loop has closed: nobody waits for this answer any more
            pass

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


async def _refuse(send: Any) -> None:
    body = b"request header names with an underscore are refused\n"
    await send({"type": "http.response.start", "status": 400, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def environ(scope: Any, body: Any, header_map: str = "drop") -> dict[str, Any]:
    """PEP 3333's environ from an ASGI HTTP scope (strings are bytes-as-latin-1, as WSGI wants).
    A header named with an underscore maps to the same key as one with a dash (X_User and X-User:
    HTTP_X_USER), so a client could pass for a proxy: it is dropped unless `header_map` is
    "dangerous" (gunicorn 22's rule and setting)."""
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
    keep_underscores = header_map == "dangerous"
    for name, value in scope.get("headers", ()):
        if b"_" in name and not keep_underscores:
            continue
        key = name.decode("latin-1").upper().replace("-", "_")
        text = value.decode("latin-1")
        if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
            env[key] = text
            continue
        key = "HTTP_" + key
        env[key] = env[key] + "," + text if key in env else text
    return env


def wrap_wsgi(app: Any, threads: int, header_map: str = "drop") -> Any:
    """An ASGI app that runs the WSGI `app` in `threads` threads."""
    return WSGIBridge(app, threads, header_map)
