"""WSGI apps under `prefork serve`: a small bridge in front of the same uvicorn path the ASGI apps use.

Why not a2wsgi's WSGIMiddleware as it is: it hops between the app's thread and the event loop for
every message (start, each body chunk, the end), and each hop is a `run_coroutine_threadsafe` plus
a blocking wait. Measured here it made short responses slower than gunicorn's gthread worker on
new connections. This bridge does one hop per request in the common case:

- the request body is read on the loop first when it is small (up to 1 MiB, the usual case), so the
  app's `wsgi.input` never waits for the loop; a larger one is streamed: the app starts with what
  came and its reads take the rest from the loop as it goes (wsgi_input.py), so memory stays flat;
- the app runs in a thread pool (`--threads`, per worker; see _Pool for how threads are woken);
  the response is gathered in that thread, and if it ends within 256 KiB the whole response goes
  back to the loop at once, resolving the request's future (_Pool.answer: one wake-up of the loop
  for every answer that comes before it runs);
- bigger or streamed responses (and `write()`) switch to streaming, one blocking hand-over per
  chunk, which is what keeps memory flat and gives back-pressure; `wsgi.file_wrapper` over a regular
  file goes out with sendfile(2) (filewrapper.py).

The environ itself (and SCRIPT_NAME/PATH_INFO with --root-path) is built in wsgi_environ.py.
"""

from __future__ import annotations

import asyncio
import collections
import io
import os
import sys
import threading
from typing import Any

from . import filewrapper, wsgi_input
from .filewrapper import FileWrapper
from .wsgi_environ import environ

READ_AHEAD = 1 << 20  # a body up to this size is read before the app starts; a larger one is streamed
GATHER_UP_TO = 256 << 10


class WSGIBridge:
    """An ASGI3 app that runs the WSGI `app` in `threads` threads."""

    def __init__(self, app: Any, threads: int, header_map: str = "drop",
                 timeout: float | None = 10.0) -> None:
        self.app = app
        self.pool = _Pool(threads)
        self.header_map = header_map
        self.timeout = timeout or None  # each wait for body bytes or for the client to read (0: none)

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
        loop = asyncio.get_running_loop()
        env = environ(scope, None, self.header_map)
        if "CONTENT_LENGTH" in env or "HTTP_TRANSFER_ENCODING" in env:  # a body comes: read it, bounded
            body = await self._read_body(receive, loop)
        else:  # none (HTTP/1.1 frames a body with one of those): the common GET, one receive
            message = await receive()
            body = None if message["type"] == "http.disconnect" else io.BytesIO(message.get("body", b""))
        if body is None:  # the client left before sending its body: nobody to answer
            return
        env["wsgi.input"] = body
        done = loop.create_future()
        self.pool.submit(_Call(self.app, env, loop, send, done, self.pool.answer, self.timeout))
        try:
            result = await done
        finally:
            body.close()
        if result is not None:  # gathered: the whole response in one go
            status, headers, data = result
            if getattr(body, "error", None) is not None:  # the rest of its body may still come: close
                headers = [*headers, (b"connection", b"close")]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": data})


    async def _read_body(self, receive: Any, loop: asyncio.AbstractEventLoop) -> Any:
        """The app's wsgi.input: all of a body of up to READ_AHEAD bytes, read here on the loop, or
        what came so far and a stream for the rest (wsgi_input.py); None if the client left. A body
        that stalls for `timeout` seconds ends there: the app gets what came, then an OSError."""
        timed = self.timeout is not None
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await (_within(receive(), self.timeout) if timed else receive())
            except asyncio.TimeoutError:
                body = wsgi_input.Body(chunks, receive, loop, self.timeout)
                body.fail(f"the client sent no request body data for {self.timeout:g} s")
                return body
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if not message.get("more_body", False):  # the usual case: the whole body in one message
                return io.BytesIO(b"".join((*chunks, chunk)) if chunks else chunk)
            chunks.append(chunk)
            size += len(chunk)
            if size >= READ_AHEAD:  # large: the app starts, and reads the rest as it goes
                return wsgi_input.Body(chunks, receive, loop, self.timeout)


if sys.version_info >= (3, 11):
    async def _within(awaitable: Any, timeout: float | None) -> Any:
        """A timer on this task, not wait_for's extra Task (a loop turn more for every request body)."""
        async with asyncio.timeout(timeout):
            return await awaitable
else:  # Python 3.10
    _within = asyncio.wait_for


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
        self.answers: collections.deque[Any] = collections.deque()  # (future, result, error)
        self.answering = False  # a _deliver is posted to the loop and has not started yet

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

    def answer(self, loop: Any, done: Any, result: Any, error: BaseException | None) -> None:
        """From a pool thread: a request's outcome to its task. One post wakes the loop for all the
        answers that come before it runs (a call_soon_threadsafe each cost a loop wake-up and a
        handle; a thread taking a stretch of requests answers many)."""
        self.answers.append((done, result, error))
        if not self.answering:
            self.answering = True
            try:
                loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop has closed: nobody waits for these answers any more
                self.answers.clear()
                self.answering = False

    def _deliver(self) -> None:
        self.answering = False  # first: an answer appended from now on posts again
        answers = self.answers
        while answers:
            _resolve(*answers.popleft())

    def shutdown(self) -> None:
        with self.lock:
            self.closed = True
            wake, self.sleeping = self.sleeping, []
            self.active += len(wake)
        for waiter in wake:
            waiter.release()


_NAMES: dict[str, bytes] = {}  # an app's response header names, as they go out; bounded
_NAMES_MAX = 256


def _name(name: str) -> bytes:
    out = name.strip().lower().encode("latin-1")
    if len(_NAMES) < _NAMES_MAX:
        _NAMES[name] = out  # a pool thread's write: one dict store, safe under the GIL
    return out


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the request's task was cancelled (shutdown timeout) while the app ran
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class _Call:
    """One request, run in a pool thread."""

    def __init__(self, app: Any, environ: dict[str, Any], loop: asyncio.AbstractEventLoop, send: Any,
                 done: Any, answer: Any, timeout: float | None = None) -> None:
        self.app = app
        self.answer = answer
        self.timeout = timeout
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
        names = _NAMES
        self.headers = [(names.get(k) or _name(k), v.strip().encode("latin-1")) for k, v in headers]
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
        self.answer(self.loop, self.done, result, error)  # _Pool.answer

    def run(self) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        iterable = self.app(self.environ, self.start_response)
        try:
            if type(iterable) is FileWrapper and self.status and not self.streaming:
                if self.environ["REQUEST_METHOD"] == "HEAD":  # no body to send: the file is not read
                    self.started = True
                    return self.status, self.headers, b""
                if self._sendfile(iterable):
                    return None
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


    def _sendfile(self, wrapper: FileWrapper) -> bool:
        """The file straight to the socket (filewrapper.py); False when it cannot go that way."""
        how = filewrapper.plan(wrapper, self.environ["REQUEST_METHOD"], self.status, self.headers, self.send)
        if how is None:
            return False
        cycle, in_fd, offset, count = how
        self.streaming = self.started = True
        start = {"type": "http.response.start", "status": self.status, "headers": self.headers}
        opening = filewrapper.open_socket(cycle, start, self.timeout)
        out_fd = asyncio.run_coroutine_threadsafe(opening, self.loop).result()
        if out_fd is None:  # the client has gone
            return True
        sent, ok = 0, True
        try:
            sent = filewrapper.pump(out_fd, in_fd, offset, count, self.timeout)
        except OSError:  # the client left, or stopped reading
            ok = False
        finally:
            os.close(out_fd)
        asyncio.run_coroutine_threadsafe(filewrapper.finish(cycle, sent, ok), self.loop).result()
        return True


async def _refuse(send: Any) -> None:
    body = b"request header names with an underscore are refused\n"
    await send({"type": "http.response.start", "status": 400, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def wrap_wsgi(app: Any, threads: int, header_map: str = "drop", timeout: float | None = 10.0) -> Any:
    """An ASGI app that runs the WSGI `app` in `threads` threads; `timeout` bounds each wait for
    request body bytes and for the client to read a sendfile response (None or 0: no bound)."""
    return WSGIBridge(app, threads, header_map, timeout)
