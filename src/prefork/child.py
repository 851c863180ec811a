"""The worker's side: its end of the channel, `cluster.worker`, and how the worker process ends.

A reader thread serves the channel while user code blocks (a `serve_forever()` still gets its
messages). It handles prefork's internal messages itself and hands user messages to one ordered
dispatcher thread (dispatch.py), so a listener may call `listen()` and wait for the primary's
answer. The process stays alive after its script's top level while it has message listeners or
open servers, and exits when the channel closes (Node's orphan rule) or the primary kills it.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable

from . import _proc
from .channel import KIND_INTERNAL, Channel, ChannelClosed, close_fds
from .dispatch import Dispatcher
from .events import report_callback_error
from .replies import Requests
from .worker import Worker

# The variables a primary sets for its worker; cleared once read, so the worker's own children
# (a prefork app started from a worker, say) start as primaries with a clean environment.
INTERNAL_ENV = ("PREFORK_WORKER_ID", "PREFORK_CHANNEL_FD", "PREFORK_PRIMARY_PID", "PREFORK_SERIALIZATION",
                "PREFORK_SUPERVISED", "PREFORK_SCHED_POLICY", "PREFORK_MAX_MESSAGE")

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class OwnProcess:
    """`cluster.worker.process` in the worker: this very process."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def kill(self, signum: int = signal.SIGTERM) -> None:
        os.kill(self.pid, signum)


class Child:
    """The runtime of one worker process."""

    def __init__(self, wid: int, channel: Channel, supervised: bool = False) -> None:
        self.channel = channel
        self.worker = Worker(wid, OwnProcess(), channel, self)
        self.worker.state = "online"
        self.dispatcher = Dispatcher(channel.read_messages, self._on_batch, self._channel_closed, self._run,
                                     lambda: not self.requests.pending())
        self.requests = Requests(self.dispatcher.need_reader)  # listen() calls (servers.py)
        self.listeners: dict[int, Any] = {}  # shared Listeners by the primary's handle id
        self._held: collections.deque[tuple[Any, Any]] = collections.deque()
        self._leaving = False
        self._gone = False  # the channel closed and `disconnect` has been emitted
        self._main_raised = False
        self._idle = threading.Condition()
        self.servers: list[Any] = []  # open Listeners (servers.py), which keep the process alive
        self.internal: dict[str, Callable[[Any, list[int]], None]] = {
            "disconnect": self._on_disconnect, "p": self._on_ping, "L": self.requests.answer,
            "+": self._on_slot_added, "-": self._on_slot_removed, "m": self._on_metrics,
        }
        self.stats: dict[str, int] = {"connections": 0, "requests": 0, "in_flight": 0}
        self.heartbeat_responder: Callable[[Callable[[], None]], None] | None = None
        self.durations: Any = None  # serve's request durations (worker_metrics.Durations)
        # `prefork serve`'s loop runs what answers a scrape (http/worker.py); other workers' callback lane
        self.metrics_responder: Callable[[Callable[[], None]], None] | None = None
        self.supervised = supervised

    # -- start -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.dispatcher.start()
        _proc.on_main_end(self._keep_alive, self._on_main_raised)
        self.channel.send_internal({"t": "online"})

    # -- reading the channel (dispatch.py runs these on its threads) -----------------------------

    def _on_batch(self, batch: list[tuple[int, Any, list[int]]]) -> list[Any]:
        """What one read brought (on the reading thread, dispatch.py): internal messages are
        handled now, in order; user messages become ordered callbacks, returned."""
        users = []
        for kind, message, fds in batch:
            if kind == KIND_INTERNAL:
                self._on_internal(message, fds)
            else:
                users.append((message, fds))
        return [(self._deliver, (users,))] if users else []

    def _on_internal(self, message: Any, fds: list[int]) -> None:
        """Internal messages are prefork's own: a failing handler is reported, never allowed to
        end the reader thread (the worker would stop hearing its primary)."""
        name = message[0] if isinstance(message, list) and message else \
            message.get("t") if isinstance(message, dict) else None
        handler = self.internal.get(name)  # type: ignore[arg-type]
        if handler is None:
            close_fds(fds)
            return
        try:
            handler(message, fds)
        except Exception:
            report_callback_error(f"internal message {name!r}")

    def _handle(self, fds: list[int]) -> socket.socket | None:
        """A user message's handle as a socket; a descriptor that is no socket is closed."""
        close_fds(fds[1:])
        try:
            return socket.socket(fileno=fds[0])
        except OSError:
            close_fds(fds[:1])
            return None

    def _deliver(self, messages: list[tuple[Any, list[int]]]) -> None:
        """An ordered callback (dispatch.py): emit a read's user messages, in order, or hold them
        until the script adds a `message` listener (as Node's event loop makes happen). One
        callback for the whole read: the per-message path is the hot one."""
        worker, held = self.worker, self._held
        emit = worker.emit
        for message, fds in messages:
            handle = self._handle(fds) if fds else None
            if held or not worker.listener_count("message"):
                held.append((message, handle))
                self._flush_held()
                continue
            try:
                emit("message", message, handle)
            except SystemExit as exc:  # emit reports every other exception of a listener
                self.exit(_proc.exit_code(exc))

    def _flush_held(self) -> None:
        worker = self.worker
        while self._held and worker.listener_count("message"):
            message, handle = self._held.popleft()
            self._run(worker.emit, "message", message, handle)

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except SystemExit as exc:
            self.exit(_proc.exit_code(exc))
        except BaseException:
            report_callback_error(getattr(fn, "__qualname__", repr(fn)))

    # -- the primary's answers about shared servers (servers.py) ---------------------------------

    def _on_slot_added(self, message: list[Any], fds: list[int]) -> None:
        listener = self.listeners.get(message[1]) if len(message) == 3 and len(fds) == 1 else None
        if listener is None:
            close_fds(fds)
            return
        listener._add_source(message[2], socket.socket(fileno=fds[0]))

    def _on_slot_removed(self, message: list[Any], fds: list[int]) -> None:
        close_fds(fds)
        listener = self.listeners.get(message[1]) if len(message) == 3 else None
        if listener is not None:
            listener._remove_source(message[2])

    # -- Side protocol for cluster.worker --------------------------------------------------------

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a callback soon, in order with the others (dispatch.py); one posted as the script
        ends still runs (_keep_alive waits for it)."""
        self.dispatcher.post(fn, *args)

    def listener_added(self, worker: Worker, event: str) -> None:
        if event == "message":
            self.post(self._flush_held)

    def kill_worker(self, worker: Worker, signum: int) -> None:
        """`cluster.worker.kill()` in a worker: leave at once, with code 0 (as Node)."""
        self._announce_leaving()
        self.channel.shutdown()
        self.exit(0)

    def disconnect_worker(self, worker: Worker) -> None:
        self._announce_leaving()
        threading.Thread(target=self._drain_and_leave, name="prefork-drain", daemon=True).start()

    # -- leaving ---------------------------------------------------------------------------------

    def _announce_leaving(self) -> None:
        if not self._leaving:
            self._leaving = True
            try:
                self.channel.send_internal({"t": "leaving"})
            except ChannelClosed:
                pass

    def _on_disconnect(self, message: Any, fds: list[int]) -> None:
        self._leaving = True
        threading.Thread(target=self._drain_and_leave, name="prefork-drain", daemon=True).start()

    def _drain_and_leave(self) -> None:
        """Close every server, let them finish what they serve, then close the channel."""
        servers = list(self.servers)  # a drained server unregisters itself: keep them all to wait on
        for server in servers:
            server.drain()
        for server in servers:
            server.wait_drained()
        self.channel.shutdown()  # the reader thread sees EOF and emits `disconnect`

    def _channel_closed(self, exc: BaseException) -> None:
        """The channel is gone. `disconnect` is emitted as an ordered callback, after the messages
        before it; then the worker ends (Node's orphan rule) unless it was leaving."""
        self.channel.close()
        self.requests.closed()
        self.post(self._emit_disconnect)
        if not self._leaving:  # a callback that never returns must not keep an orphan alive
            timer = threading.Timer(2.0, self.exit, (0,))
            timer.daemon = True
            timer.start()

    def _emit_disconnect(self) -> None:
        if self.worker._emit_disconnect_once():
            self.worker.state = "disconnected"
            self._run(self.worker.emit, "disconnect")
        with self._idle:
            self._gone = True
            self._idle.notify_all()
        if not self._leaving:
            self.exit(0)  # the primary went away: Node's orphan rule
        timer = threading.Timer(2.0, self.exit, (0,))  # a script still busy after a drain is ended
        timer.daemon = True
        timer.start()

    def server_opened(self, server: Any) -> None:
        self.servers.append(server)

    def server_closed(self, server: Any) -> None:
        if server in self.servers:
            self.servers.remove(server)
        with self._idle:
            self._idle.notify_all()

    def exit(self, code: int) -> None:
        _proc.exit_now(code)

    # -- the end of the script -------------------------------------------------------------------

    def _on_main_raised(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        """Tell the primary why this worker's script failed; supervised, it prints it (once)."""
        self._main_raised = True
        if self.channel.closed or exc_type is KeyboardInterrupt:
            return False
        import traceback

        summary = "".join(traceback.format_exception_only(exc_type, exc)).strip()
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        try:
            self.channel.send_internal({"t": "fatal", "error": summary, "traceback": text})
        except (ChannelClosed, TypeError):
            return False
        return self.supervised

    # -- liveness ----------------------------------------------------------------------------------

    def _on_ping(self, message: Any, fds: list[int]) -> None:
        """Answer the primary's heartbeat; a serving loop may answer it itself (stuck loop = no answer)."""
        responder = self.heartbeat_responder
        if responder is None:
            self._pong()
            return
        try:
            responder(self._pong)
        except RuntimeError:  # its loop has ended (the worker is finishing): answer from here
            self.heartbeat_responder = None
            self._pong()

    def _pong(self) -> None:
        try:
            self.channel.send_internal(["P", self.stats])
        except ChannelClosed:
            pass

    def _on_metrics(self, message: Any, fds: list[int]) -> None:
        """A scrape of the primary's /metrics: answer with this worker's figures (worker_metrics.py),
        built on the serving loop when there is one, else on the callback lane: never on this
        reading thread, as an app's prometheus_client collectors are app code."""
        close_fds(fds)
        if len(message) not in (2, 4) or not all(type(n) is int for n in message[1:]):
            return
        seq, budget = message[1], message[2:]  # the samples and characters it may send
        responder = self.metrics_responder  # not heartbeat_responder: http.server's waits 0.5 s polls
        if responder is not None:
            try:
                responder(lambda: self._send_metrics(seq, *budget))
                return
            except RuntimeError:  # its loop has ended: the callback lane answers
                self.metrics_responder = None
        self.dispatcher.post(self._send_metrics, seq, *budget)

    def _send_metrics(self, seq: int, *budget: int) -> None:
        from .worker_metrics import answer

        try:
            figures = answer(self, *budget)
        except Exception as exc:  # a broken collector of the app's: the counters still go
            figures = {"stats": dict(self.stats), "cut": f"the app's registry failed: {exc!r}"[:1000]}
        try:
            self.channel.send_internal(["M", seq, figures])
        except ChannelClosed:
            pass

    def _keep_alive(self) -> None:
        """Runs when the script's top level ends: wait while there is something to serve."""
        with self._idle:
            while not self._main_raised and not self._gone and (
                    self.servers or self.worker.listener_count("message") or self._leaving):
                self._idle.wait(0.5)
        self.dispatcher.wait_idle(5.0)  # callbacks posted as the script ended still run


def bootstrap() -> Child:
    """Set up this process as worker PREFORK_WORKER_ID, then clear the primary's variables."""
    from ._errors import config_error

    env = os.environ
    try:
        wid = int(env["PREFORK_WORKER_ID"])
        fd = int(env["PREFORK_CHANNEL_FD"])
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ValueError(f"descriptor {fd} is not a socket")
        ppid = int(env.get("PREFORK_PRIMARY_PID", "0"))
    except (KeyError, ValueError, OSError) as exc:
        config_error("PREFORK_WORKER_ID is set, so this process would be a prefork worker, but it has no "
                     f"channel to a primary ({exc!r}); only a primary's fork() starts one: unset it")
    serialization = env.get("PREFORK_SERIALIZATION", "json")
    supervised = env.get("PREFORK_SUPERVISED") == "1"
    for name in INTERNAL_ENV:
        env.pop(name, None)
    _proc.set_parent_death_signal(signal.SIGTERM)
    if ppid and os.getppid() != ppid:
        _proc.exit_now(1)  # the primary died before we could ask to be told
    os.set_inheritable(fd, False)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends workers quietly, as Node's
    if supervised:
        import faulthandler

        faulthandler.enable()  # a worker killed with SIGABRT for a missed heartbeat dumps its stacks
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the primary drains us on Ctrl-C
    child = Child(wid, Channel(socket.socket(fileno=fd), serialization, blocking=True), supervised)
    child.start()
    return child
