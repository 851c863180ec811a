"""The serving loop of one `prefork serve` worker: the accept loop over prefork's listeners, uvicorn's
protocol on each connection, the counters `ctl status` and /metrics show, and the drain."""

from __future__ import annotations

import _socket
import asyncio
import logging
import select
import socket
import sys
import threading
import time
from email.utils import formatdate
from typing import Any

from ..binding import ACCEPT_RETRY_S, OUT_OF_RESOURCES
from ..linger import linger
from . import eager, keepalive, limits
from .uvconfig import FAST, BootError

IDLE_GRACE = 2.0  # seconds a draining worker waits for the next request of an idle keep-alive connection


class Server:
    """The serving loop of one worker; also what the worker's runtime waits on while draining."""

    def __init__(self, opts: dict[str, Any], config: Any, child: Any) -> None:
        from uvicorn.server import ServerState

        self.opts = opts
        self.config = config
        self.child = child
        self.state = ServerState()
        self.loop = asyncio.get_running_loop()
        self._uvloop = type(self.loop).__module__.startswith("uvloop")
        self._accepted = _Accepted if self._uvloop else socket.socket
        self.listeners: list[Any] = []
        self.lifespan: Any = None
        self.stopping = False
        self.stopped = asyncio.Event()
        self._drained = threading.Event()
        self.connections_total = 0
        self._finished: dict[int, int] = {}
        self._flush_scheduled = False
        self.least_conn = opts.get("policy") == "least_conn"
        self._protocols: dict[int, Any] = {}
        self._connecting = 0
        self.date_header = opts.get("date_header", True)  # --no-date-header
        self.sweep: limits.Sweep | None = None  # closes connections whose request head is late
        stats = getattr(child, "stats", None) if child is not None else None
        if stats is None:
            stats = {"connections": 0, "requests": 0, "in_flight": 0}
            if child is not None:
                child.stats = stats
        self.stats = stats
        from ..worker_metrics import Durations

        self.durations = Durations()  # prefork_request_duration_seconds (worker_metrics.py)
        if child is not None:
            child.durations = self.durations

    # -- start -----------------------------------------------------------------------------------

    async def start(self) -> None:
        import prefork

        self.lifespan = self.config.lifespan_class(self.config)
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            raise BootError("the app's lifespan startup failed (see the error above)")
        self._tick()
        for bind in self.opts["binds"]:
            address = bind[1] if bind[0] == "unix" else (bind[1], bind[2])
            try:
                listener = prefork.listen(address, backlog=self.opts.get("backlog"))
            except OSError as exc:
                raise BootError(f"cannot listen on {_show(bind)}: {exc.strerror or exc}") from None
            listener.setblocking(False)
            protocol = self._protocol_class(listener)
            self._protocols[id(listener)] = protocol
            listener.drainer = self.drain
            self.listeners.append(listener)
            waiting = select.poll()  # says whether another connection waits, without a failed accept
            waiting.register(listener.fileno(), select.POLLIN)
            factory = self._factory(protocol)
            self.loop.add_reader(listener.fileno(), self._on_readable, listener, factory, waiting)
            listener.set_eager()  # _on_readable takes all that waits: batches are welcome
        if self.child is not None:
            self.child.server_opened(self)
            # the heartbeat is answered from this loop: a stuck loop misses it and gets replaced
            self.child.heartbeat_responder = self._answer_heartbeat
            self.child.metrics_responder = self._answer_heartbeat  # a scrape (child.py), fresh counts too

    def _answer_heartbeat(self, pong: Any) -> None:
        def answer() -> None:
            self._count()
            pong()
        self.loop.call_soon_threadsafe(answer)

    def _protocol_class(self, listener: Any) -> Any:
        """uvicorn's protocol, counting connections (and reporting closed ones for least_conn)."""
        server = self
        base = self.config.http_protocol_class
        ws_base = self.config.ws_protocol_class

        ws_class = None
        if ws_base is not None:
            class CountedWS(ws_base):  # type: ignore[misc, valid-type]
                def connection_lost(self, exc: Exception | None) -> None:
                    super().connection_lost(exc)
                    server._closed(listener)

            ws_class = CountedWS

        class Counted(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kw: Any) -> None:
                super().__init__(*args, **kw)
                if ws_class is not None:
                    self.ws_protocol_class = ws_class

            def connection_made(self, transport: Any) -> None:
                server.connections_total += 1
                self.made = time.perf_counter()  # when its first head may begin (limits.Sweep)
                super().connection_made(transport)

            def connection_lost(self, exc: Exception | None) -> None:
                super().connection_lost(exc)
                server._closed(listener)

        if hasattr(base, "on_message_begin"):  # httptools' parser says when a request begins
            _cheap_addresses(base)
            from ..worker_metrics import time_requests

            lazy = keepalive.install(Counted, base)
            time_requests(Counted, base, self.durations)
            if limits.install(Counted, base, self.opts, lazy) and self.opts.get("timeout_header", 10.0):
                self.sweep = limits.Sweep(float(self.opts.get("timeout_header", 10.0)), Counted)
            eager.install(Counted, base)  # last: it wraps the data_received limits.py gave
        if FAST[0]:
            return Counted  # onewrite's cycle adds `Connection: close` itself while we leave

        class CountedH11(Counted):
            def on_headers_complete(self) -> None:
                super().on_headers_complete()
                if server.stopping and getattr(self, "cycle", None) is not None:
                    self.cycle.keep_alive = False  # answered with `Connection: close`: the worker leaves

        return CountedH11

    # -- accepting -------------------------------------------------------------------------------

    def _factory(self, protocol: Any) -> Any:
        config, state, app_state = self.config, self.state, self.lifespan.state
        return lambda: protocol(config=config, server_state=state, app_state=app_state, _loop=self.loop)

    def _on_readable(self, listener: Any, factory: Any, waiting: Any) -> None:
        """Takes the connections that wait, up to 64. After each, a poll(2) of the listener says
        whether another waits: accepting until EAGAIN cost a failed accept4 per wake-up (about 5 us
        here: the kernel makes and frees a file for it) and two exceptions, and one connection per
        call (as libuv's servers) left a burst of new clients waiting behind whole loop turns (2,000
        at once timed some out)."""
        for _ in range(64):
            if self.stopping:
                return
            try:
                sock = listener.accept_socket(self._accepted)  # no peer address: uvloop reads it itself
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # the listener closed under us (drain), a slot moved away...
                if exc.errno in OUT_OF_RESOURCES:  # ...or out of descriptors: what waits stays
                    fd = listener.fileno()  # readable, so stop watching it for a while
                    self.loop.remove_reader(fd)
                    later = (fd, listener, factory, waiting)
                    self.loop.call_later(ACCEPT_RETRY_S, self._resume_accepting, *later)
                return
            self._serve_socket(factory, sock, listener)
            if not waiting.poll(0):
                return

    def _resume_accepting(self, fd: int, listener: Any, factory: Any, waiting: Any) -> None:
        if not self.stopping and listener.fileno() == fd:
            self.loop.add_reader(fd, self._on_readable, listener, factory, waiting)

    def _serve_socket(self, factory: Any, sock: Any, listener: Any) -> None:
        if not self._uvloop:  # libuv makes the socket non-blocking and sets TCP_NODELAY itself
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connecting += 1  # accepted, not yet a connection of uvicorn's: a drain waits for it too
        if self.config.ssl is None:
            self._step(self.loop.connect_accepted_socket(factory, sock), sock, listener)
        else:
            self.loop.create_task(self._connect(factory, sock, listener))

    def _step(self, coro: Any, sock: Any, listener: Any) -> None:
        """Drives connect_accepted_socket without a Task per connection (measured: 3-5 us of about
        55 per Connection: close request); without TLS it awaits one future, connection_made."""
        try:
            waiting = coro.send(None)
        except StopIteration:
            self._connecting -= 1
        except (Exception, asyncio.CancelledError) as exc:  # a peer that left at once
            logging.getLogger("prefork.serve").debug("connection dropped: %s", exc)
            sock.close()
            self._closed(listener)
            self._connecting -= 1
        else:
            add = getattr(waiting, "add_done_callback", None)
            if add is None:  # a bare yield: go on next turn, as a Task would
                self.loop.call_soon(self._step, coro, sock, listener)
            else:
                add(lambda _future: self._step(coro, sock, listener))

    async def _connect(self, factory: Any, sock: Any, listener: Any) -> None:
        try:
            await self.loop.connect_accepted_socket(factory, sock, ssl=self.config.ssl)
        except Exception as exc:  # a TLS handshake that fails, a peer that left at once
            logging.getLogger("prefork.serve").debug("connection dropped: %s", exc)
            sock.close()
            self._closed(listener)
        finally:
            self._connecting -= 1

    def _closed(self, listener: Any) -> None:
        if not self.least_conn:
            return
        key = id(listener)
        self._finished[key] = self._finished.get(key, 0) + 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_finished)

    def _flush_finished(self) -> None:
        """One message per loop turn, not one per connection."""
        self._flush_scheduled = False
        for listener in self.listeners:
            n = self._finished.pop(id(listener), 0)
            if n:
                try:
                    listener.report_finished(n)
                except OSError:
                    pass

    # -- bookkeeping -----------------------------------------------------------------------------

    def _tick(self) -> None:
        """Every 100 ms: the Date header (as uvicorn's main loop) and the counters for `ctl status`."""
        now = time.time()
        if int(now) != getattr(self, "_second", None):
            self._second = int(now)
            date = [(b"date", formatdate(now, usegmt=True).encode())] if self.date_header else []
            self.state.default_headers = date + self.config.encoded_headers
        self._count()
        if self.sweep is not None:
            try:
                self.sweep.maybe(self.state.connections)
            except Exception:  # the clock must go on (the Date header, the counters)
                logging.getLogger("prefork.serve").exception("the request head sweep failed")
        if not self.stopped.is_set():
            self.loop.call_later(0.1, self._tick)

    def _count(self) -> None:
        stats = self.stats
        stats["connections"] = self.connections_total
        stats["requests"] = self.state.total_requests
        stats["in_flight"] = len(self.state.tasks)
        stats["open"] = len(self.state.connections)  # "connections" counts all accepted

    # -- draining --------------------------------------------------------------------------------

    def drain(self) -> None:
        """Called from the child's drain thread (reload, stop, scale down): stop gracefully."""
        self.loop.call_soon_threadsafe(self.begin_shutdown)

    def wait_drained(self, timeout: float | None = None) -> bool:
        return self._drained.wait(timeout)

    def begin_shutdown(self) -> None:
        if not self.stopping:
            self.stopping = True
            if FAST[0]:
                from .onewrite import Cycle

                Cycle.leaving = True  # responses from now on say `Connection: close`
            self.loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        """Stop accepting, close idle keep-alive connections, let requests in flight finish, then
        run lifespan shutdown (uvicorn's Server.shutdown, with our listeners)."""
        lingering = []
        for listener in self.listeners:
            try:
                self.loop.remove_reader(listener.fileno())
            except (ValueError, OSError):
                pass
            self._take_pending(listener)  # already ours: serve them, don't reset them
            if listener.refusing():  # the pool stops: a late handshake may still land (linger.py)
                lingering.append(listener)
            else:
                listener.close()
        for connection in list(self.state.connections):
            if not _idle(connection):
                connection.shutdown()  # the response in progress goes out with `Connection: close`
        if lingering:
            await linger(lingering, self._take_pending)
            for listener in lingering:
                listener.close()
        if self.state.connections or self.state.tasks:
            await asyncio.sleep(0.05)  # the responses cut short above go out first
        timeout = self.opts.get("graceful_timeout")
        try:
            await asyncio.wait_for(self._wait_idle(), timeout=timeout)
        except asyncio.TimeoutError:
            for task in list(self.state.tasks):
                task.cancel()
        await self.lifespan.shutdown()
        self._tick()
        self.stopped.set()

    def _take_pending(self, listener: Any) -> bool:
        """Serve the connections waiting on `listener` now; whether there were any."""
        taken = listener.take_pending()
        if taken:
            factory = self._factory(self._protocols[id(listener)])
            for sock, _addr in taken:
                self._serve_socket(factory, sock, listener)
        return bool(taken)

    async def _wait_idle(self) -> None:
        """Until every connection has closed. An idle keep-alive connection gets IDLE_GRACE to send
        its next request (answered with `Connection: close`): closing it at once would race with a
        request already on its way, the error a reload must not cause."""
        deadline = self.loop.time() + IDLE_GRACE
        while self.state.connections or self.state.tasks or self._connecting:
            if self.loop.time() >= deadline:
                for connection in list(self.state.connections):
                    if _idle(connection):
                        connection.shutdown()
            await asyncio.sleep(0.05)

    def finished(self) -> None:
        self._drained.set()
        if self.child is not None:
            self.child.heartbeat_responder = None  # the loop ends: the channel's thread answers now
            self.child.metrics_responder = None
            self.child.server_closed(self)


def _local_address(transport: Any) -> tuple[str, int | None] | None:
    """The scope's "server" as uvicorn gives it, from the address the transport read when the
    connection was made (uvloop and asyncio both keep it): uvicorn asks the transport for a socket
    object and calls getsockname() on it, two socket objects and three system calls, about 5 us."""
    info = transport.get_extra_info("sockname")
    if isinstance(info, tuple):
        return str(info[0]), int(info[1])
    return (info, None) if isinstance(info, str) else None


def _remote_address(transport: Any) -> tuple[str, int] | None:
    """The scope's "client" (None for a unix socket), as _local_address."""
    info = transport.get_extra_info("peername")
    return (str(info[0]), int(info[1])) if isinstance(info, tuple) else None


def _cheap_addresses(base: Any) -> None:
    """Have uvicorn's httptools protocol (`base`) use the two functions above for each connection's
    addresses (the module-level names its connection_made calls), in this worker process only."""
    module = sys.modules.get(base.__module__)
    if module is not None and hasattr(module, "get_local_addr") and hasattr(module, "get_remote_addr"):
        module.get_local_addr = _local_address
        module.get_remote_addr = _remote_address


class _Accepted(socket.socket):
    """An accepted connection for uvloop's connect_accepted_socket, which reads `family` twice and
    `type` once: here the plain numbers, where socket.socket makes an IntEnum each time (0.9 us)."""

    __slots__ = ()
    family = _socket.socket.family  # type: ignore[assignment]
    type = _socket.socket.type  # type: ignore[assignment]


def _idle(connection: Any) -> bool:
    """No request in progress: between two requests of a keep-alive connection (or before the first)."""
    cycle = getattr(connection, "cycle", None)
    return cycle is None or cycle.response_complete


def _show(bind: list[Any]) -> str:
    return f"unix:{bind[1]}" if bind[0] == "unix" else f"{bind[1]}:{bind[2]}"
