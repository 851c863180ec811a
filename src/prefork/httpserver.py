"""`HTTPServer` and `ThreadingHTTPServer`: http.server's classes, listening through the primary.

They bind with `prefork.listen()` instead of a socket of their own, so every worker serves the same
port (in the primary they bind a plain socket). Everything else is http.server's: the handler
classes, `serve_forever()`, `server_close()`, the context manager.

What they add is the graceful stop a worker performs on `disconnect()`: stop accepting at once (so
the primary sends new connections to other workers), let requests in flight finish, close keep-alive
connections once their current response is written or at once when idle (otherwise an idle client
would hold the worker forever, as it holds Node's disconnect()), and make `serve_forever()` return
promptly.
For TLS pass `ssl_context=`: each connection is wrapped server-side, its handshake done in the
thread that serves it (the listener is not a socket that `SSLContext.wrap_socket()` could wrap).
"""

from __future__ import annotations

import functools
import http.server
import socket
import socketserver
import ssl
import threading
import time
from typing import Any

from .binding import ACCEPT_RETRY_S, OUT_OF_RESOURCES
from .linger import linger_blocking

__all__ = ["HTTPServer", "ThreadingHTTPServer"]

IDLE_GRACE = 2.0  # seconds an idle keep-alive connection may take to send its next request during a drain


class _Conn:
    """One connection being served: idle (waiting for a request line) or busy, and how many served."""

    __slots__ = ("sock", "idle", "served")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.idle = True
        self.served = 0


class _DrainAware:
    """Mixed into the user's handler class: marks the connection busy/idle around each request."""

    server: Any
    rfile: Any
    close_connection: bool

    def handle_one_request(self) -> None:
        server = self.server
        conn = server._conn_of(self)
        if conn is None:
            super().handle_one_request()  # type: ignore[misc]
            return
        with server._conn_lock:
            conn.idle = True
        peek = getattr(self.rfile, "peek", None)
        try:
            data = peek(1) if peek is not None else b"?"  # blocks while idle; consumes nothing
        except (OSError, ValueError):
            data = b""
        with server._conn_lock:
            conn.idle = False
        if not data:
            self.close_connection = True
            return
        stats = server._stats
        stats["in_flight"] += 1
        try:
            super().handle_one_request()  # type: ignore[misc]
        finally:
            stats["in_flight"] -= 1
            stats["requests"] += 1
        conn.served += 1
        if server._draining:
            self.close_connection = True  # answer this one, then close: the worker is leaving

    def end_headers(self) -> None:
        """While draining, every response says `Connection: close`, so no client sends another
        request on a connection the worker is about to close (the keep-alive race of a reload)."""
        if self.server._draining and self.request_version != "HTTP/0.9":
            sent = b"".join(getattr(self, "_headers_buffer", [])).lower()
            if b"\r\nconnection:" not in sent:
                self.send_header("Connection", "close")
            self.close_connection = True
        super().end_headers()  # type: ignore[misc]


class _PreforkServerMixin:
    """The parts shared by both classes: binding through prefork.listen() and the graceful stop."""

    socket: Any
    server_address: Any
    RequestHandlerClass: Any

    def __init__(self, server_address: Any, RequestHandlerClass: Any,  # noqa: N803 - stdlib's name
                 bind_and_activate: bool = True, *, backlog: int | None = None, exclusive: bool = False,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        handler = _handler_class(RequestHandlerClass)
        socketserver.BaseServer.__init__(self, server_address, handler)  # type: ignore[arg-type]
        self._tracks_idle = handler is not RequestHandlerClass
        self.socket = None
        self.backlog = backlog or getattr(self, "request_queue_size", 5)
        self.exclusive = exclusive
        self.ssl_context = ssl_context
        self._draining = False
        self._conn_lock = threading.Lock()
        self._conns: dict[int, _Conn] = {}  # id(request socket) -> state
        self._all_done = threading.Condition(self._conn_lock)
        self._report = False
        self._stats = {"connections": 0, "requests": 0, "in_flight": 0}
        self._pongs: list[Any] = []
        self._in_serve_forever = False
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    # -- socketserver's hooks --------------------------------------------------------------------

    def server_bind(self) -> None:
        """Listen through the primary (http.server would bind a socket of its own)."""
        import prefork

        address = self.server_address
        if isinstance(address, (tuple, list)) and len(address) >= 2:
            address = (address[0], int(address[1]))
        listener = prefork.listen(address, backlog=self.backlog if self.backlog > 5 else None,
                                  exclusive=self.exclusive)
        listener.drainer = self.drain
        listener.wait_drained = self.wait_drained  # the listener is drained when our requests are
        self._report = listener.hid is not None and prefork.scheduling_policy == prefork.SCHED_LEAST_CONN
        from . import _role

        child = _role.child
        self._stats = child.stats if child is not None else dict(self._stats)
        if child is not None:
            child.heartbeat_responder = self._answer_heartbeat
        self.socket = listener
        self.server_address = listener.getsockname()
        if isinstance(self.server_address, tuple):
            host, port = self.server_address[:2]
            self.server_name = socket.getfqdn(host)
            self.server_port = port
        else:
            self.server_name = self.server_address
            self.server_port = None

    def _answer_heartbeat(self, pong: Any) -> None:
        """Answered from serve_forever()'s loop (service_actions), so a stuck loop stays silent;
        outside serve_forever() (handle_request() users) the channel's thread answers."""
        if self._in_serve_forever:
            self._pongs.append(pong)
        else:
            pong()

    def service_actions(self) -> None:
        super().service_actions()  # type: ignore[misc]
        while self._pongs:
            self._pongs.pop()()

    def server_activate(self) -> None:
        """listen() has already made the socket listen."""

    def server_close(self) -> None:
        if self.socket is not None:
            self.socket.close()

    def fileno(self) -> int:
        return self.socket.fileno()

    def get_request(self) -> tuple[Any, Any]:
        try:
            conn, addr = self.socket.accept()
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES and not self._draining:
                # what waits stays readable: serve_forever() would call again at once and spin
                time.sleep(ACCEPT_RETRY_S)
            raise
        return self._prepare(conn), addr

    def _prepare(self, conn: Any) -> Any:
        """TLS-wrap (handshake later, in the serving thread) and track a new connection."""
        if self.ssl_context is not None:
            try:
                conn = self.ssl_context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            except BaseException:
                conn.close()
                self._finished()
                raise
        self._track(conn)
        return conn

    def _track(self, conn: Any) -> None:
        self._stats["connections"] += 1
        state = _Conn(conn)
        state.idle = self._tracks_idle  # a handler we could not wrap is never treated as idle
        with self._conn_lock:
            self._conns[id(conn)] = state

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.do_handshake()  # here, in the thread that serves it, not in the accept loop
        super().finish_request(request, client_address)  # type: ignore[misc]

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)  # type: ignore[misc]
        with self._conn_lock:
            self._conns.pop(id(request), None)
            self._all_done.notify_all()
        self._finished()

    def _finished(self) -> None:
        if self._report:
            try:
                self.socket.report_finished(1)
            except Exception:  # the channel closed: nobody to tell
                pass

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """As socketserver's; on the worker's disconnect it returns once the requests in flight are
        answered (at once if there are none), so the script can end without cutting them off."""
        if not self._draining:
            self._in_serve_forever = True
            try:
                super().serve_forever(poll_interval)  # type: ignore[misc]
            finally:
                self._in_serve_forever = False
                self.service_actions()
        if self._draining:
            self.wait_drained()

    def _conn_of(self, handler: Any) -> _Conn | None:
        return self._conns.get(id(handler.request))

    # -- the graceful stop -----------------------------------------------------------------------

    def drain(self) -> None:
        """Stop accepting now; finish the requests in flight, each answered with `Connection: close`;
        a keep-alive connection gets IDLE_GRACE to send its next request, then is closed."""
        with self._conn_lock:
            if self._draining:
                return
            self._draining = True
            self._BaseServer__shutdown_request = True  # serve_forever() leaves when it next wakes
        if self.socket is not None:
            self._serve_pending(self.socket)  # waiting for us: serve them
            if self.socket.refusing():  # the pool stops: a late handshake may still land
                linger_blocking([self.socket], self._serve_pending)
            self.socket.close()  # wakes serve_forever() at once; the primary sends new ones elsewhere
        timer = threading.Timer(IDLE_GRACE, self._close_idle)
        timer.daemon = True
        timer.start()

    def _serve_pending(self, listener: Any) -> bool:
        taken = listener.take_pending()
        for request, client_address in taken:
            try:
                self.process_request(self._prepare(request), client_address)
            except Exception:
                self.handle_error(request, client_address)
        return bool(taken)

    def _close_idle(self) -> None:
        """Shut the read side of idle connections: their handler sees EOF and ends; no response lost."""
        with self._conn_lock:
            for conn in list(self._conns.values()):
                if not conn.idle:
                    continue
                sock = conn.sock
                try:
                    if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) if not isinstance(
                            sock, ssl.SSLSocket) else sock.pending():
                        continue  # a request is arriving: serve it
                except (BlockingIOError, InterruptedError):
                    pass
                except (OSError, ValueError):
                    pass
                try:
                    sock.shutdown(socket.SHUT_RD)
                except (OSError, ValueError):
                    pass

    def wait_drained(self, timeout: float | None = None) -> bool:
        """True once the listener is closed and every connection has been answered and closed."""
        with self._all_done:
            return self._all_done.wait_for(lambda: self._draining and not self._conns, timeout)


def _handler_class(cls: Any) -> Any:
    """The user's handler class with _DrainAware mixed in (once per class); partials too."""
    if isinstance(cls, functools.partial):
        inner = _handler_class(cls.func)
        return cls if inner is cls.func else functools.partial(inner, *cls.args, **cls.keywords)
    if not (isinstance(cls, type) and issubclass(cls, http.server.BaseHTTPRequestHandler)):
        return cls
    if issubclass(cls, _DrainAware):
        return cls
    cached = _handler_classes.get(cls)
    if cached is None:
        cached = type(cls.__name__, (_DrainAware, cls), {"__module__": cls.__module__,
                                                          "__qualname__": cls.__qualname__})
        _handler_classes[cls] = cached
    return cached


_handler_classes: dict[Any, Any] = {}


class HTTPServer(_PreforkServerMixin, http.server.HTTPServer):
    """http.server.HTTPServer listening through the primary; serves one request at a time."""


class ThreadingHTTPServer(_PreforkServerMixin, http.server.ThreadingHTTPServer):
    """http.server.ThreadingHTTPServer listening through the primary; a thread per connection."""
