"""The `Worker` object: one per worker process, in the primary and (as `cluster.worker`) in the worker.

It holds what Node's Worker holds (id, process, state, `exited_after_disconnect`) and forwards
actions to the side that owns the process: the primary's bookkeeping or the worker's own runtime.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from .channel import Channel, ChannelClosed
from .events import EventEmitter

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    class Side(Protocol):
        """What a Worker needs from whoever owns it (primary.Primary or child.Child)."""

        def post(self, fn: Callable[..., Any], *args: Any) -> None: ...
        def kill_worker(self, worker: Worker, signum: int) -> None: ...
        def disconnect_worker(self, worker: Worker) -> None: ...
        def listener_added(self, worker: Worker, event: str) -> None: ...


class Worker(EventEmitter):
    """A worker process as seen by the primary, or by the worker itself."""

    def __init__(self, id: int, process: Any, channel: Channel | None, side: Side) -> None:
        super().__init__()
        self.id = id
        self.process = process
        self.state = "none"
        self.exited_after_disconnect: bool | None = None
        self._channel = channel
        self._side = side
        self._disconnect_emitted = False
        # the primary's bookkeeping (primary.py): its exit watch, its last heartbeat and counters,
        # why its script died, and which bad messages were already reported
        self._pidfd: int | None = None
        self.last_beat: float | None = None
        self.stats: dict[str, int] = {}
        self.fatal: dict[str, str] | None = None
        self.bad_messages: set[str] = set()

    def __repr__(self) -> str:
        pid = getattr(self.process, "pid", None)
        return f"<Worker id={self.id} pid={pid} state={self.state}>"

    def send(self, message: Any, handle: Any = None, callback: Callable[[], Any] | None = None) -> bool:
        """Send a message (and optionally a socket) to the other side. False once disconnected (and
        'error' is emitted), or while the channel is backed up (the message is queued all the same)."""
        fds = () if handle is None else (_fileno(handle),)
        channel = self._channel
        if channel is not None and not channel.closed:
            try:
                sent = channel.send_message(message, fds, callback)
            except ChannelClosed:
                sent = False
            if sent or not channel.closed:  # False on an open channel: backed up, yet queued
                return sent
        self._side.post(self.emit, "error", ChannelClosed(f"worker {self.id}: channel is closed"))
        return False

    def kill(self, signal: str | int = "SIGTERM") -> None:
        """Send `signal` at once; the exit then counts as intended (`exited_after_disconnect`)."""
        from ._proc import parse_signal

        signum = parse_signal(signal)
        self.exited_after_disconnect = True
        self._side.kill_worker(self, signum)

    destroy = kill

    def disconnect(self) -> Worker:
        """Graceful: stop new connections, let in-flight work finish, close the channel, exit."""
        self.exited_after_disconnect = True
        self._side.disconnect_worker(self)
        return self

    def is_connected(self) -> bool:
        return self._channel is not None and not self._channel.closed

    def is_dead(self) -> bool:
        return self.state == "dead"

    # Node's camelCase spellings, for code ported from Node.
    isConnected = is_connected
    isDead = is_dead

    @property
    def exitedAfterDisconnect(self) -> bool | None:  # noqa: N802 - Node's name
        return self.exited_after_disconnect

    def _listener_added(self, event: str) -> None:
        self._side.listener_added(self, event)

    def _emit_disconnect_once(self) -> bool:
        if self._disconnect_emitted:
            return False
        self._disconnect_emitted = True
        return True


def _fileno(handle: Any) -> int:
    if isinstance(handle, int):
        return handle
    if isinstance(handle, socket.socket) or hasattr(handle, "fileno"):
        return handle.fileno()
    raise TypeError(f"handle must be a socket or have fileno(), not {type(handle).__name__}")
