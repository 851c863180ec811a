"""The worker's side: its end of the channel, `cluster.worker`, and how the worker process ends.

A reader thread serves the channel while user code blocks (a `serve_forever()` still gets its
messages) and runs message callbacks one at a time. The process stays alive after its script's
top level while it has message listeners or open servers, and exits when the channel closes
(Node's orphan rule) or the primary kills it.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import threading
from collections.abc import Callable

from . import _proc
from .channel import KIND_INTERNAL, Channel, ChannelClosed, ProtocolError
from .events import report_callback_error
from .worker import Worker

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

    def __init__(self, wid: int, channel: Channel) -> None:
        self.channel = channel
        self.worker = Worker(wid, OwnProcess(), channel, self)
        self.worker.state = "online"
        self._dispatch = threading.RLock()
        self._held: collections.deque[tuple[Any, Any]] = collections.deque()
        self._leaving = False
        self._gone = False  # the channel closed and `disconnect` has been emitted
        self._main_raised = False
        self._idle = threading.Condition()
        self.servers: list[Any] = []  # open Listeners (servers.py), which keep the process alive
        self.internal: dict[str, Callable[[Any, list[int]], None]] = {
            "disconnect": self._on_disconnect, "p": self._on_ping,
        }
        self.stats: dict[str, int] = {"connections": 0, "requests": 0, "in_flight": 0}
        self.heartbeat_responder: Callable[[Callable[[], None]], None] | None = None
        self.supervised = os.environ.get("PREFORK_SUPERVISED") == "1"
        self.replies: Any = None  # servers.Requests, set when the first listen() happens

    # -- start -----------------------------------------------------------------------------------

    def start(self) -> None:
        threading.Thread(target=self._read_forever, name="prefork-channel", daemon=True).start()
        _proc.on_main_end(self._keep_alive, self._on_main_raised)
        self.channel.send_internal({"t": "online"})

    # -- the reader thread -----------------------------------------------------------------------

    def _read_forever(self) -> None:
        read = self.channel.read_messages
        on_internal = self._on_internal
        deliver = self._deliver
        while True:
            try:
                batch = read()
                i, n = 0, len(batch)
                while i < n:
                    if batch[i][0] == KIND_INTERNAL:
                        on_internal(batch[i][1], batch[i][2])
                        i += 1
                    else:  # a run of user messages: one lock for all of it
                        i = deliver(batch, i, n)
            except (ChannelClosed, ProtocolError) as exc:
                self._channel_closed(exc)
                return

    def _on_internal(self, message: Any, fds: list[int]) -> None:
        """Internal messages are prefork's own: a failing handler is reported, never allowed to
        end the reader thread (the worker would stop hearing its primary)."""
        name = message[0] if isinstance(message, list) else message["t"]
        try:
            self.internal[name](message, fds)
        except Exception:
            report_callback_error(f"internal message {name!r}")

    def _deliver(self, batch: list[tuple[int, Any, list[int]]], i: int, n: int) -> int:
        """Deliver the user messages from batch[i] on, in order, up to the next internal one.

        Messages are held until the script adds a `message` listener; returns where it stopped.
        """
        worker = self.worker
        emit = worker.emit
        held = self._held
        with self._dispatch:
            while i < n:
                kind, message, fds = batch[i]
                if kind == KIND_INTERNAL:
                    break
                i += 1
                handle = None
                if fds:
                    handle = socket.socket(fileno=fds[0])
                    for fd in fds[1:]:
                        os.close(fd)
                if held or not worker.listener_count("message"):
                    held.append((message, handle))
                    self._flush_held()
                    continue
                try:
                    emit("message", message, handle)
                except SystemExit as exc:
                    self.exit(_proc.exit_code(exc))
        return i

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

    # -- Side protocol for cluster.worker --------------------------------------------------------

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a callback soon, one at a time with the others. Not a daemon thread: a callback
        posted as the script ends still runs (a daemon thread printing at exit aborts Python)."""
        def call() -> None:
            with self._dispatch:
                self._run(fn, *args)
        threading.Thread(target=call, name="prefork-callback").start()

    def listener_added(self, worker: Worker, event: str) -> None:
        if event == "message" and self._held:
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
        self.channel.close()
        with self._dispatch:
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

    def _keep_alive(self) -> None:
        """Runs when the script's top level ends: wait while there is something to serve."""
        with self._idle:
            while not self._main_raised and not self._gone and (
                    self.servers or self.worker.listener_count("message") or self._leaving):
                self._idle.wait(0.5)


def bootstrap() -> Child:
    """Set up this process as worker PREFORK_WORKER_ID; clear the variables so children aren't."""
    env = os.environ
    try:
        wid = int(env.pop("PREFORK_WORKER_ID"))
        fd = int(env.pop("PREFORK_CHANNEL_FD"))
        os.fstat(fd)
    except (KeyError, ValueError, OSError) as exc:
        raise RuntimeError("PREFORK_WORKER_ID is set, so this process is a prefork worker, but it has no "
                           f"channel to a primary ({exc!r}); only a primary's fork() starts one") from None
    ppid = int(env.pop("PREFORK_PRIMARY_PID", "0"))
    serialization = env.pop("PREFORK_SERIALIZATION", "json")
    _proc.set_parent_death_signal(signal.SIGTERM)
    if ppid and os.getppid() != ppid:
        _proc.exit_now(1)  # the primary died before we could ask to be told
    os.set_inheritable(fd, False)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends workers quietly, as Node's
    if env.get("PREFORK_SUPERVISED") == "1":
        import faulthandler

        faulthandler.enable()  # a worker killed with SIGABRT for a missed heartbeat dumps its stacks
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the primary drains us on Ctrl-C
    child = Child(wid, Channel(socket.socket(fileno=fd), serialization, blocking=True))
    child.start()
    return child
