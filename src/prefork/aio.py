"""asyncio servers listening through the primary: `start_server()` and `create_server()`.

They take asyncio's own arguments and return a `Server` that behaves like `asyncio.Server`. Each
connection the worker gets (handed over by the primary, or accepted on a shared socket) becomes a
transport with `loop.connect_accepted_socket()`, so `ssl=` and every protocol work unchanged.

The server counts its open connections through the sockets it gives the transports: that feeds
the `least_conn` policy (reported once per loop iteration) and the graceful stop. On the worker's
`disconnect()` the server stops accepting at once, lets its connections finish, and only then do
`wait_closed()` and `serve_forever()` return (normally, so `asyncio.run()` ends quietly).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .binding import ACCEPT_RETRY_S, OUT_OF_RESOURCES
from .linger import linger

__all__ = ["Server", "create_server", "start_server"]


class _ConnSocket(socket.socket):
    """An accepted connection that tells its server when the transport closes it."""

    _on_close: Callable[[], None] | None = None

    def close(self) -> None:
        callback, self._on_close = self._on_close, None
        super().close()
        if callback is not None:
            callback()


class Server:
    """What `create_server()` returns: asyncio.Server's interface over prefork listeners."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listeners: list[Any], protocol_factory: Any,
                 ssl: Any, backlog: int, ssl_handshake_timeout: float | None,
                 ssl_shutdown_timeout: float | None) -> None:
        import prefork

        self._loop = loop
        self._listeners = listeners
        self._protocol_factory = protocol_factory
        self._ssl = ssl
        self._backlog = max(1, backlog)
        self._tls_kw: dict[str, Any] = {}
        if ssl is not None:
            if ssl_handshake_timeout is not None:
                self._tls_kw["ssl_handshake_timeout"] = ssl_handshake_timeout
            if ssl_shutdown_timeout is not None:
                self._tls_kw["ssl_shutdown_timeout"] = ssl_shutdown_timeout
        self._serving = False
        self._closed = False
        self._fds: dict[Any, int] = {}  # listener -> the fd we watch (fileno() is -1 once closed)
        self._active = 0
        self._unreported: dict[Any, int] = {}
        self._flush_scheduled = False
        self._idle = threading.Event()  # closed and no connection left: the drain is over
        self._forever: asyncio.Future[None] | None = None
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._socks: set[_ConnSocket] = set()
        self._lingering: asyncio.Task[None] | None = None  # the drain's wait for late handshakes
        self._report = prefork.scheduling_policy == prefork.SCHED_LEAST_CONN
        for listener in listeners:
            listener.setblocking(False)
            listener.drainer = self._drain_from_any_thread
            listener.wait_drained = self._wait_drained

    # -- asyncio.Server's interface --------------------------------------------------------------

    @property
    def sockets(self) -> tuple[Any, ...]:
        """The listeners (getsockname(), fileno()); empty once closed, as asyncio's."""
        return () if self._closed else tuple(self._listeners)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        self._start_serving()

    def _start_serving(self) -> None:
        if self._serving or self._closed:
            return
        self._serving = True
        _answer_heartbeats_from(self._loop)
        for listener in self._listeners:
            fd = listener.fileno()
            self._fds[listener] = fd
            self._loop.add_reader(fd, self._on_acceptable, listener)
            listener.set_eager()  # _on_acceptable takes all that waits: batches are welcome

    async def serve_forever(self) -> None:
        """Serve until close() or the worker's disconnect; returns once every connection has ended."""
        if self._forever is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._closed:
            raise RuntimeError(f"server {self!r} is closed")
        self._start_serving()
        self._forever = self._loop.create_future()
        try:
            await self._forever
        except asyncio.CancelledError:
            self.close()
            raise
        finally:
            self._forever = None
        await self.wait_closed()

    def close(self) -> None:
        """Stop accepting now (connections being served carry on, as asyncio's close())."""
        if self._closed:
            return
        self._closed = True
        self._serving = False
        for listener in self._listeners:
            fd = self._fds.pop(listener, None)
            if fd is not None:
                self._loop.remove_reader(fd)
            listener.close()
        if self._forever is not None and not self._forever.done():
            self._forever.set_result(None)
        self._check_idle()

    async def wait_closed(self) -> None:
        """Wait until closed and every connection has ended (Python 3.12's meaning)."""
        while not self._idle.is_set():
            waiter = self._loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def close_clients(self) -> None:
        for sock in list(self._socks):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    abort_clients = close_clients

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
        await self.wait_closed()

    def __repr__(self) -> str:
        return f"<prefork.aio.Server sockets={self.sockets!r}>"

    # -- accepting -------------------------------------------------------------------------------

    def _on_acceptable(self, listener: Any) -> None:
        for _ in range(self._backlog):
            try:
                sock = listener.accept_socket(_ConnSocket)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # closed meanwhile, or out of descriptors
                if exc.errno in OUT_OF_RESOURCES:
                    self._back_off(listener)
                return
            self._adopt(listener, sock)

    def _back_off(self, listener: Any) -> None:
        """Out of descriptors: what waits stays readable, so stop watching it for a while."""
        fd = self._fds.get(listener)
        if fd is None:
            return
        self._loop.remove_reader(fd)

        def resume() -> None:
            if self._serving and self._fds.get(listener) == fd:
                self._loop.add_reader(fd, self._on_acceptable, listener)

        self._loop.call_later(ACCEPT_RETRY_S, resume)

    def _adopt(self, listener: Any, sock: _ConnSocket) -> None:
        _worker_stats()["connections"] += 1
        sock._on_close = lambda listener=listener, sock=sock: self._conn_closed(listener, sock)
        self._active += 1
        self._socks.add(sock)
        self._loop.create_task(self._connect(sock))

    async def _connect(self, sock: _ConnSocket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol_factory, sock, ssl=self._ssl,
                                                     **self._tls_kw)
        except Exception as exc:  # a failed TLS handshake, a factory that raised...
            sock.close()
            if not isinstance(exc, (ConnectionError, TimeoutError, OSError)):
                self._loop.call_exception_handler({
                    "message": "prefork: could not set up an accepted connection",
                    "exception": exc, "socket": sock,
                })

    def _conn_closed(self, listener: Any, sock: Any) -> None:
        """Runs where the transport closed the socket: the loop thread."""
        self._socks.discard(sock)
        self._active -= 1
        if self._report:
            self._unreported[listener] = self._unreported.get(listener, 0) + 1
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush_reports)
        self._check_idle()

    def _flush_reports(self) -> None:
        """One report per listener per loop iteration, however many connections closed in it."""
        self._flush_scheduled = False
        unreported, self._unreported = self._unreported, {}
        for listener, count in unreported.items():
            try:
                listener.report_finished(count)
            except Exception:  # the channel closed: nobody left to tell
                pass

    def _check_idle(self) -> None:
        if not (self._closed and self._active <= 0):
            return
        self._idle.set()
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- the worker's graceful stop (called from the drain thread) -------------------------------

    def _drain_from_any_thread(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nothing is being served any more
            for listener in self._listeners:
                listener.close()
            self._idle.set()

    def _drain(self) -> None:
        """Serve the connections already waiting for this worker, then close (stop accepting). A
        listener that refuses new connections (the pool stops) is kept while late handshakes land
        on it (servers.py: Listener.refusing)."""
        if self._closed:
            return
        lingering = []
        for listener in self._listeners:
            fd = self._fds.pop(listener, None)
            if fd is not None:
                self._loop.remove_reader(fd)
            self._take_pending(listener)
            if listener.refusing():
                lingering.append(listener)
        if lingering:
            self._lingering = self._loop.create_task(self._close_after(linger(lingering, self._take_pending)))
        else:
            self.close()

    def _take_pending(self, listener: Any) -> bool:
        taken = listener.take_pending(_ConnSocket)
        for conn, _addr in taken:
            self._adopt(listener, conn)
        return bool(taken)

    async def _close_after(self, lingering: Any) -> None:
        try:
            await lingering
        finally:
            self.close()

    def _wait_drained(self, timeout: float | None = None) -> bool:
        """Block (in the drain thread) until every connection has ended, or the loop is gone."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._idle.wait(0.1):
            if self._loop.is_closed() or not self._loop.is_running():
                return True  # nobody serves the connections left any more
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return True


def _answer_heartbeats_from(loop: asyncio.AbstractEventLoop) -> None:
    """The primary's heartbeat is answered by this loop: a loop stuck in a callback stays silent
    and the supervisor replaces the worker (answering from the channel thread would hide it)."""
    from . import _role

    child = _role.child
    if child is not None:
        child.heartbeat_responder = lambda pong: loop.call_soon_threadsafe(pong)


_OWN_STATS = {"connections": 0, "requests": 0, "in_flight": 0}  # in the primary: counted, unreported


def _worker_stats() -> dict[str, int]:
    """This worker's counters for `ctl status`, looked up when used (the role may change by fork)."""
    from . import _role

    child = _role.child
    return child.stats if child is not None else _OWN_STATS


def _hosts(host: Any) -> list[Any]:
    if host is None or host == "":
        return ["0.0.0.0"]
    if isinstance(host, str):
        return [host]
    if isinstance(host, Iterable):
        return list(host) or ["0.0.0.0"]
    return [host]


async def create_server(protocol_factory: Callable[[], asyncio.BaseProtocol], host: Any = None,
                        port: int | None = None, *, path: str | None = None, family: int = 0,
                        flags: int = 0, sock: socket.socket | None = None, backlog: int = 100,
                        ssl: Any = None, reuse_address: bool | None = None, reuse_port: bool | None = None,
                        ssl_handshake_timeout: float | None = None,
                        ssl_shutdown_timeout: float | None = None, start_serving: bool = True,
                        exclusive: bool = False) -> Server | asyncio.AbstractServer:
    """loop.create_server(), listening through the primary; `path=` for a unix socket.

    `family`, `flags`, `reuse_address` and `reuse_port` are accepted and ignored (the primary
    binds); with `sock=` the socket is served by asyncio itself, as given.
    """
    import prefork

    loop = asyncio.get_running_loop()
    if sock is not None:
        return await loop.create_server(protocol_factory, sock=sock, backlog=backlog, ssl=ssl,
                                        ssl_handshake_timeout=ssl_handshake_timeout,
                                        start_serving=start_serving)
    if ssl_handshake_timeout is not None and ssl is None:
        raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
    if path is not None:
        addresses: list[Any] = [path]
    else:
        addresses = [(h, port or 0) for h in _hosts(host)]
    listeners: list[Any] = []
    try:
        for address in addresses:
            listeners.append(await loop.run_in_executor(
                None, lambda a=address: prefork.listen(a, backlog=backlog, exclusive=exclusive)))
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    server = Server(loop, listeners, protocol_factory, ssl, backlog, ssl_handshake_timeout,
                    ssl_shutdown_timeout)
    if start_serving:
        server._start_serving()
        await asyncio.sleep(0)
    return server


async def start_server(client_connected_cb: Callable[..., Any], host: Any = None, port: int | None = None,
                       *, limit: int = 2 ** 16, **kw: Any) -> Server | asyncio.AbstractServer:
    """asyncio.start_server(), listening through the primary."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(factory, host, port, **kw)


async def start_unix_server(client_connected_cb: Callable[..., Any], path: str | None = None, *,
                            limit: int = 2 ** 16, **kw: Any) -> Server | asyncio.AbstractServer:
    """asyncio.start_unix_server(), listening through the primary."""
    return await start_server(client_connected_cb, limit=limit, path=path, **kw)
