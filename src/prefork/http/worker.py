"""One `prefork serve` worker: an asyncio loop (uvloop when installed) running uvicorn's protocols.

The primary hands connections over (or lets us accept on a shared / SO_REUSEPORT socket); we take
them from each `prefork.listen()` Listener as soon as its fd is readable and give each socket to
uvicorn's HTTP protocol with `loop.connect_accepted_socket`, so parsing, keep-alive, WebSocket
upgrades, lifespan and graceful shutdown are uvicorn's well-tested code. We only add: the accept
loop, counters for `prefork ctl status`, the drain the primary asks for on reload and stop, and
one write per response instead of two (onewrite.py).

Started by the primary as `python -m prefork.http.worker` with the options as JSON in the
environment variable PREFORK_SERVE (see prefork/cli/serve.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from email.utils import formatdate
from typing import Any

from .. import logfile, logline, proctitle
from ..binding import ACCEPT_RETRY_S, OUT_OF_RESOURCES

ENV_OPTIONS = "PREFORK_SERVE"
BOOT_ERROR = 3  # exit code of a worker whose app could not start (as gunicorn's)


IDLE_GRACE = 2.0  # seconds a draining worker waits for the next request of an idle keep-alive connection


_fast = [False]  # onewrite's response path is installed (httptools is there)


class BootError(Exception):
    """The app could not start in this worker; the message is for a person."""


def _configure_logging(wid: int, level: str, fmt: str = "text") -> None:
    """Each worker's log lines carry its id, so interleaved output stays readable."""
    handler = logging.StreamHandler(logline.raw(sys.stderr))
    handler.setFormatter(logline.json_formatter(wid) if fmt == "json" else
                         logging.Formatter(f"[worker {wid}] %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if level != "trace" else 5)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(root.level)
    access = logging.getLogger("uvicorn.access")  # our own CLF middleware logs access instead
    access.handlers[:] = []
    access.propagate = False


def _load(opts: dict[str, Any]) -> tuple[Any, str]:
    from .asgi import import_app, resolve_interface

    spec = opts["app"]
    app = import_app(spec, factory=opts.get("factory", False), app_dir=opts.get("app_dir"))
    return app, resolve_interface(app, opts.get("interface", "auto"), spec)


def _build_config(opts: dict[str, Any], app: Any, interface: str, out: Any = None) -> Any:
    import uvicorn

    ws = opts.get("ws", "auto")
    if interface == "wsgi":
        from .wsgi import wrap_wsgi

        app, interface, ws = wrap_wsgi(app, opts.get("threads") or 8), "asgi3", "none"
    if opts.get("access_log") or opts.get("access_log_format"):
        from .asgi import AccessLog

        if interface == "asgi2":
            from uvicorn.middleware.asgi2 import ASGI2Middleware

            app, interface = ASGI2Middleware(app), "asgi3"
        out = out or sys.stdout

        def write(line: str) -> None:
            from prefork import _stdio

            _stdio.write(line, out)  # a closed log pipe is silenced, never an error in a request

        app = AccessLog(app, write, opts.get("access_log_format"), logline.is_json())
    try:
        import httptools  # noqa: F401

        from . import onewrite

        _fast[0] = onewrite.install()  # one write per response, headers checked once (onewrite.py)
        http = "httptools"
    except ImportError:
        http = "h11"
    config = uvicorn.Config(
        app,
        interface=interface,  # type: ignore[arg-type]
        http=http,
        ws=ws,
        lifespan=opts.get("lifespan", "auto"),  # type: ignore[arg-type]
        log_config=None,
        access_log=False,
        proxy_headers=bool(opts.get("proxy_headers", False)),
        forwarded_allow_ips=opts.get("forwarded_allow_ips") or "127.0.0.1",
        root_path=opts.get("root_path") or "",
        ssl_certfile=opts.get("certfile"),
        ssl_keyfile=opts.get("keyfile"),
        timeout_keep_alive=int(opts.get("keep_alive", 5)),
        timeout_graceful_shutdown=None,
        loop="none",
        server_header=True,
        workers=1,  # else uvicorn parses WEB_CONCURRENCY (a bad value crashed it); cli/config.py reads it
    )
    config.load()
    return config


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
            self.loop.add_reader(listener.fileno(), self._on_readable, listener, protocol)
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
                super().connection_made(transport)

            def connection_lost(self, exc: Exception | None) -> None:
                super().connection_lost(exc)
                server._closed(listener)

        if hasattr(base, "on_message_begin"):  # httptools' parser says when a request begins
            from ..worker_metrics import time_requests

            time_requests(Counted, base, self.durations)
        if _fast[0]:
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

    def _on_readable(self, listener: Any, protocol: Any) -> None:
        factory = self._factory(protocol)
        for _ in range(64):
            if self.stopping:
                return
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # the listener closed under us (drain), a slot moved away...
                if exc.errno in OUT_OF_RESOURCES:  # ...or out of descriptors: what waits stays
                    fd = listener.fileno()  # readable, so stop watching it for a while
                    self.loop.remove_reader(fd)
                    self.loop.call_later(ACCEPT_RETRY_S, self._resume_accepting, fd, listener, protocol)
                return
            self._serve_socket(factory, sock, listener)

    def _resume_accepting(self, fd: int, listener: Any, protocol: Any) -> None:
        if not self.stopping and listener.fileno() == fd:
            self.loop.add_reader(fd, self._on_readable, listener, protocol)

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
            date = [(b"date", formatdate(now, usegmt=True).encode())]
            self.state.default_headers = date + self.config.encoded_headers
        self._count()
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
            if _fast[0]:
                from .onewrite import Cycle

                Cycle.leaving = True  # responses from now on say `Connection: close`
            self.loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        """Stop accepting, close idle keep-alive connections, let requests in flight finish, then
        run lifespan shutdown (uvicorn's Server.shutdown, with our listeners)."""
        for listener in self.listeners:
            try:
                self.loop.remove_reader(listener.fileno())
            except (ValueError, OSError):
                pass
            factory = self._factory(self._protocols[id(listener)])
            for sock, _addr in listener.take_pending():  # already ours: serve them, don't reset them
                self._serve_socket(factory, sock, listener)
            listener.close()
        for connection in list(self.state.connections):
            if not _idle(connection):
                connection.shutdown()  # the response in progress goes out with `Connection: close`
        await asyncio.sleep(0.05)
        timeout = self.opts.get("graceful_timeout")
        try:
            await asyncio.wait_for(self._wait_idle(), timeout=timeout)
        except asyncio.TimeoutError:
            for task in list(self.state.tasks):
                task.cancel()
        await self.lifespan.shutdown()
        self._tick()
        self.stopped.set()

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


def _idle(connection: Any) -> bool:
    """No request in progress: between two requests of a keep-alive connection (or before the first)."""
    cycle = getattr(connection, "cycle", None)
    return cycle is None or cycle.response_complete


def _show(bind: list[Any]) -> str:
    return f"unix:{bind[1]}" if bind[0] == "unix" else f"{bind[1]}:{bind[2]}"


async def _serve(opts: dict[str, Any], child: Any, app: Any, interface: str, out: Any = None) -> None:
    config = _build_config(opts, app, interface, out)
    server = Server(opts, config, child)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, server.begin_shutdown)
    try:
        await server.start()
    except BaseException:
        server.stopping = True
        server.stopped.set()
        for listener in server.listeners:
            listener.close()
        raise
    await server.stopped.wait()
    server.finished()


def _report_boot_error(child: Any, message: str) -> None:
    """Tell the primary (it prints the line once for all workers and stops), or print it ourselves."""
    if child is not None:
        try:
            child.channel.send_internal({"t": "boot_error", "message": message})
            return
        except Exception:
            pass
    print(f"prefork: error: {message}", file=sys.stderr, flush=True)


def run(opts: dict[str, Any], app: Any = None) -> int:
    """Serve until drained; the exit code. `app` is given when the primary preloaded it."""
    from prefork import _role

    child = _role.child
    wid = child.worker.id if child is not None else 0
    debug = opts.get("log_level") in ("debug", "trace")
    fmt = logline.take_worker_format()  # the primary's choice, kept out of the app's environment
    fmt = opts.get("log_format") or fmt
    _configure_logging(wid, opts.get("log_level", "info"), fmt)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the primary, which drains us
    access_out = logline.raw(sys.stdout)  # access lines are written whole, never prefixed
    if child is not None:  # what the app prints carries the worker's id, as the log lines do
        from prefork.cli._boot import wrap_output

        wrap_output(wid, fmt)  # `[worker N] line`, or one JSON object per line
        proctitle.set_title(f"worker {wid} {opts['app']}", f"prefork-w{wid}")
        logfile.follow_reopen(opts.get("log_file"))
    # the primary reopens --log-file on SIGUSR1 and tells us through the channel; the signal sent to
    # this worker itself does the same (as gunicorn's workers), rather than end it (its default)
    signal.signal(signal.SIGUSR1, lambda *_: _reopen_log(opts.get("log_file")))
    try:
        if app is None:
            app, interface = _load(opts)
        else:
            interface = opts["interface_resolved"]
        loop_factory = _loop_factory()
        runner = asyncio.Runner(loop_factory=loop_factory) if hasattr(asyncio, "Runner") else None
        if runner is not None:
            with runner:
                runner.run(_serve(opts, child, app, interface, access_out))
        else:  # Python 3.10
            if loop_factory is not None:
                asyncio.set_event_loop_policy(__import__("uvloop").EventLoopPolicy())
            asyncio.run(_serve(opts, child, app, interface, access_out))
    except Exception as exc:
        from .asgi import AppError

        if debug or not isinstance(exc, (AppError, BootError, ImportError, SyntaxError)):
            traceback.print_exc()
        text = str(exc) if isinstance(exc, (AppError, BootError)) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (ImportError, SyntaxError)) and not isinstance(exc, AppError):
            text = f"app {opts['app']!r} failed to import: {text}"
        _report_boot_error(child, text)
        return BOOT_ERROR
    return 0


def _reopen_log(path: str | None) -> None:
    if path:
        try:
            logfile.point_stdio(path)
        except logfile.LogFileError as exc:
            print(f"prefork: cannot reopen the log file: {exc}", file=sys.stderr, flush=True)


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    opts = json.loads(os.environ.pop(ENV_OPTIONS))
    code = run(opts)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code) if code else sys.exit(0)


if __name__ == "__main__":
    main()
