"""`wsgi.input` for a request body larger than the bridge reads ahead (wsgi.py): a stream that takes
the rest from the event loop as the app reads, so a 64 MiB upload never sits whole in memory.

Each refill pulls one ASGI `http.request` message (one hop to the loop, about 64 KiB: uvicorn pauses
reading the socket past that, which is the back-pressure). read(n) waits for n bytes or the end, as a
file does (Django reads the body with one read(CONTENT_LENGTH)); readline, readlines and iteration
follow PEP 3333. The stream ends where the request's framing ends (Content-Length or the last
chunk): the app never reads into the next request.

A client that leaves, or sends nothing for `timeout` seconds, before the whole body came: the app
gets the bytes that came, then ClientDisconnected (an OSError, which werkzeug and Django read as a
truncated upload: 400 / UnreadablePostError) on its next read, never a silent short body.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any


class ClientDisconnected(OSError):
    """The request body ended early: the client closed the connection or went silent."""


class Body:
    """The request body as a file-like object read by one app thread."""

    def __init__(self, first: list[bytes], receive: Any, loop: asyncio.AbstractEventLoop,
                 timeout: float | None) -> None:
        self.buf = bytearray(b"".join(first))
        self.receive = receive
        self.loop = loop
        self.timeout = timeout
        self.more = True  # the last message said more_body
        self.error: ClientDisconnected | None = None
        self.scanned = 0  # readline: no newline in buf[:scanned]

    def fail(self, why: str) -> None:
        """The body ends here: after what came, reads raise ClientDisconnected(why)."""
        self.more = False
        self.error = ClientDisconnected(why)

    def _fill(self) -> bool:
        """One more message into the buffer; False at the end of the body (or after an error)."""
        if not self.more or self.error is not None:
            return False
        try:
            future = asyncio.run_coroutine_threadsafe(self.receive(), self.loop)
        except RuntimeError:  # the loop has closed (the worker is going away)
            self.error = ClientDisconnected("the server is shutting down; the request body was not read")
            return False
        try:
            message = future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            self.error = ClientDisconnected(f"the client sent no request body data for {self.timeout:g} s")
            return False
        except concurrent.futures.CancelledError:  # the request's task was cancelled (shutdown)
            self.error = ClientDisconnected("the request was cancelled while its body was read")
            return False
        if message.get("type") != "http.request":
            self.error = ClientDisconnected("the client closed the connection before sending the whole "
                                            "request body")
            return False
        self.more = bool(message.get("more_body", False))
        self.buf += message.get("body", b"")
        return True

    def _take(self, n: int) -> bytes:
        if not self.buf and self.error is not None:
            raise self.error  # what came was handed out before: now the app learns it ended early
        data = bytes(self.buf[:n])
        del self.buf[:n]
        self.scanned = max(0, self.scanned - n)
        return data

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            while self._fill():
                pass
            return self._take(len(self.buf))
        while len(self.buf) < size and self._fill():
            pass
        return self._take(size)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def readline(self, size: int | None = -1) -> bytes:
        limit = size if size is not None and size >= 0 else None
        while True:
            end = self.buf.find(b"\n", self.scanned)
            if end >= 0:
                n = end + 1
                break
            self.scanned = len(self.buf)
            if limit is not None and len(self.buf) >= limit:
                n = limit
                break
            if not self._fill():
                n = len(self.buf)
                break
        return self._take(n if limit is None else min(n, limit))

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines, total = [], 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self) -> Body:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.buf = bytearray()
