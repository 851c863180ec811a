"""Limits on the request head over uvicorn's httptools protocol: its size (gunicorn's limit_request_line,
limit_request_fields, limit_request_field_size) and the time it may take (--timeout-header, slowloris).

uvicorn's httptools protocol has neither: a client may send a 64 MiB header value (httptools joins
the pieces of a field in memory until it ends) or trickle a byte every few seconds and hold its
connection forever. Here:
- `install` gives the protocol class its own `on_url` and `on_header` (uvicorn's bodies plus a length
  check) and `data_received` (uvicorn's, plus a count of the bytes that came while a head is read,
  reset whenever httptools hands over a piece of it: what is left is a field httptools is still
  joining, cut once it passes the field limit, at most one socket read late);
- `Sweep` runs from the server's clock tick and closes the connections whose head is late, with no
  timer per connection and nothing per request: a head is being read when the protocol has no
  scope yet (the first request) or its scope has no "method" yet (httptools has begun a message and
  not finished its headers); it began at the connection's `made` time or the request's `began`
  (worker_metrics.time_requests). While the previous response still goes out, the head is not timed:
  the server holds the line then, not the client.
A keep-alive connection idle between requests is uvicorn's keep-alive timeout's, not ours.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import httptools

MAX_FIELDS = 32768  # what 0 means for --limit-request-fields (gunicorn's maximum)
_NO_LIMIT = sys.maxsize
_431 = b"431 Request Header Fields Too Large"
_log = logging.getLogger("prefork.serve")


class _Refused(Exception):
    """Raised from a parser callback to stop httptools once the answer went out."""


def _answer(protocol: Any, status: bytes, text: str) -> None:
    """A whole response with `Connection: close`, then the connection closes."""
    body = text.encode()
    head = b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
    head += b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    protocol.refused = True
    transport = protocol.transport
    if not transport.is_closing():
        transport.write(head + body)
        transport.close()


def _refuse(protocol: Any, status: bytes, text: str) -> None:
    _log.info("refused a request from %s: %s", _peer(protocol), text)
    _answer(protocol, status, text)
    raise _Refused(text)


def _peer(protocol: Any) -> str:
    client = getattr(protocol, "client", None)
    return f"{client[0]}:{client[1]}" if client else "a unix socket"


def install(cls: Any, base: Any, opts: dict[str, Any], lazy_keep_alive: bool = False) -> bool:
    """Give `cls` (a subclass of uvicorn's httptools protocol `base`) the size limits in `opts`.
    False (nothing done) over another protocol, or a uvicorn whose protocol changed shape.
    `lazy_keep_alive`: keepalive.py's timer is installed, so arriving bytes only mark the connection
    busy instead of cancelling uvicorn's per-request timer."""
    needed = ("on_url", "on_header", "data_received", "send_400_response", "_unset_keepalive_if_required",
              "_should_upgrade", "handle_websocket_upgrade", "_unsupported_upgrade_warning")
    if base.__name__ != "HttpToolsProtocol" or not all(hasattr(base, name) for name in needed):
        return False
    line = opts.get("limit_request_line", 4094) or _NO_LIMIT
    fields = opts.get("limit_request_fields", 100) or MAX_FIELDS
    field = opts.get("limit_request_field_size", 8190) or _NO_LIMIT
    send_400 = base.send_400_response

    url_max = line - 17  # past this, look closer: the longest common method is 7 bytes

    def on_url(self: Any, url: bytes) -> None:
        self.url += url
        # the request line is METHOD SP target SP HTTP/1.1: 10 bytes besides the method and target
        if len(self.url) > url_max and len(self.url) + len(self.parser.get_method()) + 10 > line:
            _refuse(self, b"414 URI Too Long", f"request line longer than {line} bytes")

    def on_header(self: Any, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > field or len(self.headers) >= fields:  # one test on every header
            if len(self.headers) >= fields:
                _refuse(self, _431, f"more than {fields} header fields")
            _refuse(self, _431, f"a header field is longer than {field} bytes")
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp keeps trailing whitespace; RFC 9110 5.5 excludes it
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def data_received(self: Any, data: bytes) -> None:
        if lazy_keep_alive:
            self.idle_at = None
        else:
            self._unset_keepalive_if_required()
        scope = self.scope
        head = scope is None or "method" not in scope  # a head is being read
        if head:  # what httptools has handed over so far: if that grows in this read, it holds no field
            handed = -1 if scope is None else len(self.headers) + len(self.url)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self.refused:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if head and self.scope is not None and "method" not in self.scope:  # still reading the head
            if self.scope is scope and len(self.headers) + len(self.url) == handed:
                self.head_bytes += len(data)  # all of it went to a field httptools is still joining
                if self.head_bytes > field:
                    _log.info("refused a request from %s: a header field is longer than %s bytes",
                              _peer(self), field)
                    _answer(self, _431, f"a header field is longer than {field} bytes")
            else:
                self.head_bytes = 0  # a field ended or the head began in this read: count from here

    def send_400_response(self: Any, msg: str) -> None:
        if not self.refused:  # else the answer went out already
            send_400(self, msg)

    cls.refused = False
    cls.head_bytes = 0
    cls.on_url = on_url
    cls.on_header = on_header
    cls.data_received = data_received
    cls.send_400_response = send_400_response
    return True


class Sweep:
    """Closes the connections whose request head is late; call `maybe` often (the server's 100 ms
    tick): it looks at the connections every quarter of the timeout, at most once a second."""

    def __init__(self, timeout: float, protocol_class: Any) -> None:
        self.timeout = timeout
        self.protocol_class = protocol_class  # WebSocket protocols share the set: not theirs to close
        self.every = min(1.0, timeout / 4)
        self.next = 0.0

    def maybe(self, connections: Any) -> None:
        now = time.perf_counter()
        if now < self.next:
            return
        self.next = now + self.every
        late = now - self.timeout
        http, closed = self.protocol_class, 0
        for protocol in list(connections):  # closing may end a connection (and change the set) at once
            if not isinstance(protocol, http):
                continue
            scope = protocol.scope
            if scope is None:
                since, began = protocol.made, False
            elif "method" not in scope:
                cycle = protocol.cycle  # the previous request's: while its response goes out (a stream),
                if cycle is not None and not cycle.response_complete:  # the server holds the line, not
                    continue  # the client; and a 408 would cut into that response
                since, began = protocol.began, True
            else:
                continue
            if since < late and not protocol.transport.is_closing():
                closed += 1
                if began:  # some of a request came: say why it ends
                    _answer(protocol, b"408 Request Timeout", "the request head took too long")
                else:
                    protocol.transport.close()
        if closed:  # one line per sweep, not one per connection: 10,000 idle ones are one line
            _log.info("closed %d connection(s) with no whole request head in %gs (--timeout-header)", closed,
                      self.timeout)
