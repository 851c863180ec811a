"""What workers send the primary: reading each channel, checking and dispatching its messages.

A mixin of primary.Primary, on its loop thread. User messages become `message` events; internal
ones (protocol.py) are checked at the boundary, then handled here or by who registered for them in
`Primary.internal` (handles.py for listen, cli/supervised.py for boot errors, metrics.py for the
workers' answers to a scrape of the admin endpoint's /metrics).
"""

from __future__ import annotations

import os
import socket
import time

from . import _stdio, protocol
from .channel import KIND_INTERNAL, ChannelClosed, ProtocolError, close_fds
from .channel import SPIN as _SPIN
from .worker import Worker

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Inbox:
    """The reading half of primary.Primary (see there for the state it uses)."""

    loop: Any
    cluster: Any
    servers: Any
    workers: dict[int, Worker]
    internal: dict[str, Any]

    def _maybe_stop(self) -> None: ...

    # -- the channel -----------------------------------------------------------------------------

    def _flush_soon(self, worker: Worker) -> None:
        """Write what the channel queued (a burst, or what did not fit); wait for writable if needed."""
        channel = worker._channel
        if channel is not None and not channel.closed and not channel.flush() and not channel.closed:
            self.loop.add_writer(channel.fileno(), lambda: self._on_writable(worker))

    def _on_writable(self, worker: Worker) -> None:
        channel = worker._channel
        if channel is not None and (channel.closed or channel.flush()) and channel.fileno() >= 0:
            self.loop.remove_writer(channel.fileno())

    def _on_readable(self, worker: Worker) -> None:
        """Read and dispatch what the worker sent.

        When a message handler answered with a user message, keep polling this channel for the
        reply until channel.spin_deadline() (0 when polling cannot help: spin.py), 20 SPIN in all,
        before going back to the loop: the worker's reply then comes without a wake-up, which
        across CPUs on a VM costs more than the round trip.
        """
        channel = worker._channel
        read = channel.read_messages
        on_message = self._on_message
        deadline = give_up = 0.0
        while True:
            try:
                batch = read()
            except ChannelClosed:
                self._channel_closed(worker)
                return
            except ProtocolError as exc:
                self._channel_failed(worker, exc)
                return
            for kind, message, fds in batch:
                if kind == KIND_INTERNAL:
                    self._on_internal(worker, message, fds)
                else:
                    on_message(worker, message, fds)
            if channel.error is not None:  # garbage after the good frames
                self._channel_failed(worker, channel.error)
                return
            if deadline and batch:  # what we polled for came
                channel.spin.outcome(True)
                deadline = 0.0
            if not deadline:
                deadline = channel.spin_deadline()
                if not deadline:
                    return
                channel.flush_queued()  # what the handlers queued goes out before we wait for the answer
            if self.loop.has_pending():
                return
            now = time.monotonic()
            if now >= deadline:
                channel.spin.outcome(False)
                return
            if not give_up:
                give_up = now + 20 * _SPIN
            elif now >= give_up:
                return
            if not batch:
                os.sched_yield()  # only idle time goes into the spin

    def _on_message(self, worker: Worker, message: Any, fds: list[int]) -> None:
        handle = None
        if fds:
            close_fds(fds[1:])
            try:
                handle = socket.socket(fileno=fds[0])
            except OSError as exc:  # a descriptor that is no socket: dropped, and said once
                close_fds(fds[:1])
                self._bad_message(worker, "message", f"its handle is not a socket ({exc.strerror})")
        worker.emit("message", message, handle)
        self.cluster.emit("message", worker, message, handle)

    def _on_internal(self, worker: Worker, message: Any, fds: list[int]) -> None:
        """Check an internal message at the boundary (protocol.py), then act on it. A bad one is
        refused (a listen() call gets its error back) and never stops supervision."""
        name = protocol.name_of(message)
        handler = self.internal.get(name) if name is not None else None
        try:
            if handler is None:
                raise protocol.Invalid(f"unknown internal message {name!r}")
            protocol.check(name, message, fds)  # type: ignore[arg-type]
        except protocol.Invalid as exc:
            close_fds(fds)
            self._bad_message(worker, str(name), str(exc))
            if name == "listen" and type(message) is dict and type(message.get("seq")) is int:
                self.servers.refuse(worker, message["seq"], exc)
            return
        handler(worker, message, fds)

    def _bad_message(self, worker: Worker, name: str, why: str) -> None:
        """Say once per worker and kind what was wrong; the worker's `error` event gets each."""
        worker.emit("error", ProtocolError(f"bad {name!r} message: {why}"))
        if name not in worker.bad_messages:
            worker.bad_messages.add(name)
            _stdio.write(f"prefork: worker {worker.id} (pid {worker.process.pid}) sent a bad {name!r} "
                         f"message, ignored: {why}\n")

    def _channel_failed(self, worker: Worker, exc: Exception) -> None:
        """A peer that writes garbage loses its channel; the primary lives on."""
        worker.emit("error", exc)
        self._channel_closed(worker)

    def _channel_closed(self, worker: Worker) -> None:
        channel = worker._channel
        if channel is None or not worker._emit_disconnect_once():
            return
        fd = channel.fileno()
        if fd >= 0:
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
        channel.close()
        self.servers.worker_gone(worker)
        if worker.state != "dead":
            worker.state = "disconnected"
        else:
            self.workers.pop(worker.id, None)
        worker.emit("disconnect")
        self.cluster.emit("disconnect", worker)
        self._maybe_stop()

    # -- internal messages from workers ----------------------------------------------------------

    def _on_online(self, worker: Worker, message: Any, fds: list[int]) -> None:
        worker.state = "online"
        worker.emit("online")
        self.cluster.emit("online", worker)

    def _on_listening(self, worker: Worker, message: Any, fds: list[int]) -> None:
        from .address import Address

        address = Address.from_wire(message["address"])
        worker.state = "listening"
        worker.emit("listening", address)
        self.cluster.emit("listening", worker, address)

    def _on_leaving(self, worker: Worker, message: Any, fds: list[int]) -> None:
        """The worker called its own disconnect() or kill(): its exit is intended."""
        worker.exited_after_disconnect = True

    def _on_fatal(self, worker: Worker, message: Any, fds: list[int]) -> None:
        """The worker's script died of an uncaught exception: keep why, for the supervisor."""
        worker.fatal = {"error": message["error"], "traceback": message["traceback"]}

    def _on_pong(self, worker: Worker, message: Any, fds: list[int]) -> None:
        worker.stats = message[1]
        worker.last_beat = time.monotonic()
