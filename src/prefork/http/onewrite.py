"""A faster response path for uvicorn's httptools protocol: one write per response, headers checked once.

uvicorn's request cycle writes the status line and headers when the app sends `http.response.start`
and the body on `http.response.body`; uvloop sends each write at once, so a small response costs two
send(2) calls, two TCP segments and two wake-ups of the client. It also checks every header of every
response with two regular expressions and joins the default headers (date, server) each time.
Profiled under wrk (keep-alive, hello world) these were the largest costs of a worker per request.

`Cycle.send` here builds the response itself, from the ASGI spec and HTTP/1.1's framing rules:
- the head is held until the first body message and goes out with it (the ASGI spec: a server
  "must not start sending the response to the client until it has received at least one Response
  Body event");
- each (name, value) header pair an app sends is checked once and its line kept (most apps send
  the same few every time), in a bounded table;
- the default headers are joined once per list uvicorn's clock makes (once a second).
A held head is flushed at the end of the loop iteration that started the response when no body came
in it (a streaming app's headers go out at once; hello world stays one write). While nothing has been
written, an app that fails (raises, sends a second start, a body past its length, an invalid header,
returns early) gets a whole `500 Internal Server Error` with `Connection: close`; once bytes went out,
the connection is closed, as uvicorn does.
Parsing, `receive()`, keep-alive, pipelining and upgrades stay uvicorn's. `install()` makes uvicorn
build these cycles (by the module-level name it uses), in the worker process only.
"""

from __future__ import annotations

import http
import re
from asyncio import get_running_loop
from typing import Any

from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

JOIN_UP_TO = 64 << 10  # a bigger body goes out after the head with writelines, not copied onto it
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 field names
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # no CR, LF or other controls in a value
_PLAIN, _LENGTH, _CHUNKED, _CLOSE = range(4)  # what a header means for the framing
_lines: dict[tuple[bytes, bytes], tuple[bytes, int, int]] = {}
_LINES_MAX = 512
_default: list[Any] = [None, b""]  # the default-headers list seen last, and its joined lines
_held: list[Any] = []  # cycles that started a response in this loop iteration
_flush_on: list[Any] = [None]  # the loop a flush of _held is scheduled on (one call_soon per iteration)


def _status_line(code: int) -> bytes:
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {code} {phrase}\r\n".encode()


_STATUS = {code: _status_line(code) for code in range(100, 600)}


def _line(pair: Any) -> tuple[bytes, int, int]:
    """(header line, its kind, the content length if it is one), checked once per pair."""
    try:
        known = _lines.get(pair if type(pair) is tuple else tuple(pair))
    except TypeError:  # not hashable (a list of lists, say): checked every time
        known = None
    if known is not None:
        return known
    name, value = pair
    if not _TOKEN.fullmatch(name):
        raise RuntimeError(f"invalid response header name {name!r}")
    if _BAD_VALUE.search(value):
        raise RuntimeError(f"invalid response header value {value!r} (control characters)")
    name = name.lower()
    kind, length = _PLAIN, 0
    if name == b"content-length":
        kind, length = _LENGTH, int(value)
    elif name == b"transfer-encoding" and value.strip().lower() == b"chunked":
        kind = _CHUNKED
    elif name == b"connection" and b"close" in (t.strip().lower() for t in value.split(b",")):
        kind = _CLOSE
    entry = (name + b": " + value + b"\r\n", kind, length)
    if len(value) <= 256:
        if len(_lines) >= _LINES_MAX:
            _lines.clear()
        _lines[(pair[0], value)] = entry
    return entry


def _defaults(headers: list[tuple[bytes, bytes]]) -> bytes:
    if headers is not _default[0]:
        _default[1] = b"".join(name.lower() + b": " + value + b"\r\n" for name, value in headers)
        _default[0] = headers
    return _default[1]


_HEADERS_500 = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21"),
                (b"connection", b"close")]


class Cycle(RequestResponseCycle):
    """uvicorn's request cycle with the response path above (`receive` stays uvicorn's)."""

    head: bytes | None = None  # the status line and headers, until the first body message
    sent = False  # a byte of the response went out: too late for a 500
    leaving = False  # set when the worker drains: every response says `Connection: close`

    async def run_asgi(self, app: Any) -> None:
        """uvicorn's run_asgi, but an app that fails while nothing was written gets a whole 500."""
        if self.access_log:
            return await super().run_asgi(app)
        try:
            result = await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            await self._failed()
        else:
            if result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
                await self._failed()
            elif not self.response_complete and not self.disconnected:
                said = "completing" if self.response_started else "starting"
                self.logger.error("ASGI callable returned without %s response.", said)
                await self._failed()
        finally:
            self.on_response = lambda: None

    async def _failed(self) -> None:
        if self.sent or self.response_complete or self.disconnected:
            if not self.transport.is_closing():
                self.transport.close()
            return
        self.head, self.response_started, self.keep_alive = None, False, False
        self.chunked_encoding, self.expected_content_length = None, 0
        await self.send({"type": "http.response.start", "status": 500, "headers": _HEADERS_500})
        await self.send({"type": "http.response.body", "body": b"Internal Server Error"})

    def _flush(self) -> None:
        if not self.disconnected and not self.transport.is_closing():
            self.transport.write(self.head)
            self.sent = True
        self.head = None

    async def send(self, message: Any) -> None:
        if self.access_log:  # uvicorn's own access log (prefork serve logs its own way)
            return await super().send(message)
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"the app sent {kind!r} before 'http.response.start'")
            self._start(message)
        elif not self.response_complete:
            if kind != "http.response.body":
                raise RuntimeError(f"the app sent {kind!r} where 'http.response.body' was expected")
            self._body(message.get("body", b""), message.get("more_body", False))
        else:
            raise RuntimeError(f"the app sent {kind!r} after its response was complete")

    def _start(self, message: Any) -> None:
        if self.leaving:
            self.keep_alive = False
        self.response_started = True
        self.waiting_for_100_continue = False
        status = message["status"]
        parts = [_STATUS.get(status) or _status_line(status), _defaults(self.default_headers)]
        closing = False
        for pair in message.get("headers", ()):
            line, kind, length = _line(pair)
            if kind == _LENGTH:
                if self.chunked_encoding is None:  # the first framing header counts
                    self.chunked_encoding, self.expected_content_length = False, length
            elif kind == _CHUNKED:
                self.chunked_encoding, self.expected_content_length = True, 0
            elif kind == _CLOSE:
                self.keep_alive, closing = False, True
            parts.append(line)
        if not self.keep_alive and not closing:
            parts.append(b"connection: close\r\n")
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in (204, 304):
            self.chunked_encoding = True  # no length given: the body goes in chunks
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        self.head = b"".join(parts)
        loop = get_running_loop()
        if _flush_on[0] is not loop:  # not one call_soon per response: 1 us, 3 % of a hello world
            _flush_on[0] = loop
            loop.call_soon(_flush_held)
        _held.append(self)

    def _body(self, body: bytes, more: bool) -> None:
        if self.scope["method"] == "HEAD":
            self.expected_content_length, data = 0, b""
        elif self.chunked_encoding:
            data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more:
                data += b"0\r\n\r\n"
        else:
            if len(body) > self.expected_content_length:
                raise RuntimeError("the response body is longer than its Content-Length")
            self.expected_content_length -= len(body)
            data = body
        head, self.head, self.sent = self.head, None, True
        if head is None:
            if data:
                self.transport.write(data)
        elif len(data) <= JOIN_UP_TO:
            self.transport.write(head + data)
        else:
            self.transport.writelines((head, data))
        if not more:
            if self.expected_content_length:
                raise RuntimeError("the response body is shorter than its Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()


def _flush_held() -> None:
    """End of the iteration that started these responses: a head still held goes out alone."""
    _flush_on[0] = None
    held = _held[:]
    _held.clear()
    for cycle in held:
        if cycle.head is not None:  # else its body came in the same iteration (or it failed)
            cycle._flush()


def install() -> bool:
    """Have uvicorn's httptools protocol build these cycles, in this process. Only over uvicorn's own
    class, with the attributes used here (a uvicorn that changed shape keeps its own path)."""
    current = httptools_impl.RequestResponseCycle
    if current is RequestResponseCycle and hasattr(httptools_impl, "HttpToolsProtocol"):
        httptools_impl.RequestResponseCycle = Cycle  # type: ignore[misc]
        return True
    return current is Cycle
