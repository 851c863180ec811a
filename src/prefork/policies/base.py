"""The small interface every scheduling policy implements, behind one handle per shared address."""

from __future__ import annotations

import socket
from typing import Any

from ..binding import accept_new, is_adopted, refuse_new
from ..channel import close_fds  # noqa: F401 - the policies' one way to drop descriptors


class Handle:
    """One address served by several workers. Subclasses decide how connections reach them.

    The registry (handles.Servers) calls `add` when a worker listens, `pause` when it starts to
    drain, `remove` when it closes its listener or its channel goes, `accepted`/`finished` for the
    workers' connection reports, and `close` when no worker is left.
    """

    policy = ""

    def __init__(self, servers: Any, hid: int, family: int, addr: Any, backlog: int) -> None:
        self.servers = servers
        self.loop = servers.primary.loop
        self.id = hid
        self.family = family
        self.addr = addr
        self.backlog = backlog
        self.key: tuple[Any, ...] = ()  # set by the registry, which looks handles up by it
        self.workers: dict[int, Any] = {}
        self.closed = False
        self.stopped = False  # stop_accepting() was called: a new listen() gets a new handle
        self.passed_on = False  # its sockets were passed to a new primary (upgrade.py): not ours alone
        self.refusing = False  # refuse_new() attached its filter
        self.sockname: Any = None

    def has(self, worker: Any) -> bool:
        return worker.id in self.workers

    def add(self, worker: Any, link: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Take a worker in; returns the reply for its listen() and the descriptors to pass.

        `link` is the hand-off link's descriptor (handoff.py) the worker sent, for policies that
        hand connections over; others close it."""
        raise NotImplementedError

    def pause(self, worker: Any) -> None:
        """The worker drains: send it nothing new."""

    def remove(self, worker: Any) -> None:
        self.workers.pop(worker.id, None)

    def accepted(self, worker: Any, count: int) -> None:
        """The worker took `count` handed-over connections (rr policies)."""

    def finished(self, worker: Any, count: int) -> None:
        """The worker closed `count` connections (for load-aware policies)."""

    def stop_accepting(self) -> None:
        """The cluster is stopping: stop taking new connections, keep serving the taken ones.
        Here the workers accept: no new handshake completes on our sockets from now on, and each
        worker's drain takes what is queued on them (servers.py take_pending), so that nothing is
        left to reset when the last copy closes."""
        self.refuse_new()

    def sockets(self) -> list[socket.socket]:
        """The listening sockets of this address that the primary holds."""
        sock = getattr(self, "sock", None)
        return [sock] if sock is not None else []

    def refuse_new(self) -> None:
        """binding.refuse_new on every socket of this address, unless another process serves it
        too (systemd's or a previous primary's socket, or one passed on to a new primary): the
        filter would stop it there as well."""
        if self.passed_on or is_adopted(self.family, self.addr):
            return
        for sock in self.sockets():
            self.refusing = refuse_new(sock) or self.refusing

    def accept_new(self) -> None:
        """A worker listens here again after the stop began (cluster.disconnect(), then fork()):
        the sockets complete handshakes again."""
        self.refusing = False
        for sock in self.sockets():
            accept_new(sock)

    def close(self) -> None:
        self.closed = True


def wire_name(sock: socket.socket) -> Any:
    """getsockname() in a form that crosses the channel as JSON."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        return name.decode()
    return list(name[:2]) if isinstance(name, tuple) else name
