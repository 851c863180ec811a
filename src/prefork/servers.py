"""The worker's side of shared servers: `listen()` and the `Listener` it returns.

A Listener gathers the ways connections reach this worker: descriptors the primary hands over
(round robin, least_conn: they come on the listener's own hand-off link, handoff.py, read by
whichever thread calls accept()) and listening sockets it may accept on itself (none, reuseport,
exclusive, or any listen in the primary). An epoll descriptor over all of them is its `fileno()`,
so it works with `selectors`, asyncio's `add_reader` and `socketserver`; `accept()` blocks like a
socket's.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import socket
import sys
import threading

from . import binding, handoff
from .address import Address, normalize

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any



class Listener:
    """A server socket shared through the primary."""

    def __init__(self, family: int, address: Address, hid: int | None = None, child: Any = None,
                 link: socket.socket | None = None) -> None:
        self.family = family
        self.type = socket.SOCK_STREAM
        self.address = address
        self.hid = hid
        self._child = child
        self._lock = threading.Lock()
        self._queue: collections.deque[int] = collections.deque()
        self._sources: dict[int, socket.socket] = {}
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(self._wake, select.EPOLLIN)
        self._signaled = False  # the wake eventfd is set: descriptors wait in _queue
        self._link = link  # round robin: connections from the primary arrive here
        self._report = False  # the primary wants to know when connections close (least_conn)
        self._cut_logged = False  # a record arrived cut (out of descriptors): logged once
        if link is not None:
            self._epoll.register(link.fileno(), select.EPOLLIN)
        self._timeout: float | None = None
        self._closed = False
        self._drained = threading.Event()
        self.drainer: Any = None  # a server built on this listener drains it its own way
        self.on_close: list[Any] = []

    # -- what a socket offers --------------------------------------------------------------------

    def fileno(self) -> int:
        """Readable while a connection waits (an epoll fd: usable with select/selectors/asyncio)."""
        return self._epoll.fileno() if not self._closed else -1

    def getsockname(self) -> Any:
        a = self.address
        return a.address if a.address_type == "unix" else (a.address, a.port)

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def settimeout(self, value: float | None) -> None:
        self._timeout = value

    def gettimeout(self) -> float | None:
        return self._timeout

    def accept(self) -> tuple[socket.socket, Any]:
        """Wait for the next connection, as socket.accept() does (honours setblocking/settimeout)."""
        while True:
            conn = self._try_accept()
            if conn is not None:
                return conn
            if self._timeout == 0.0:
                raise BlockingIOError(errno.EAGAIN, "no connection waiting")
            try:
                ready = self._epoll.poll(-1 if self._timeout is None else self._timeout)
            except ValueError:  # closed by another thread
                raise OSError(errno.EBADF, "listener is closed") from None
            if not ready and self._timeout is not None:
                raise TimeoutError("timed out")

    def accept_socket(self, cls: type[socket.socket] = socket.socket) -> socket.socket:
        """The next waiting connection as a `cls` socket, without the peer's address, never
        blocking (BlockingIOError when none waits): for servers that do not need the address
        (asyncio's, `prefork serve`), one system call and one socket object fewer per connection."""
        sock, _addr = self._next(cls)
        if sock is None:
            raise BlockingIOError(errno.EAGAIN, "no connection waiting")
        return sock

    def set_eager(self) -> None:
        """Say that this listener's server takes every waiting connection at once (an event
        loop's accept callback that loops until BlockingIOError): under rr and least_conn the
        primary then sends all of a wake-up's connections for this worker in one record, one
        sendmsg and one wake-up instead of one each. The price: connections received in such a
        record but not yet taken are lost if the worker is killed in between (microseconds for
        such a server), as connections it had accepted itself would be."""
        with self._lock:
            if self._link is not None and not self._closed:
                try:
                    handoff.send_count(self._link, handoff.EAGER)
                except OSError:
                    pass

    def _try_accept(self, cls: type[socket.socket] = socket.socket) -> tuple[socket.socket, Any] | None:
        sock, addr = self._next(cls)
        if sock is None:
            return None
        return sock, addr if addr is not None else _peer(sock)

    def _next(self, cls: type[socket.socket]) -> tuple[socket.socket | None, Any]:
        """A handed-over connection (address unknown: None) or one accepted here (with it)."""
        if self._closed:
            raise OSError(errno.EBADF, "listener is closed")
        if self._queue or self._link is not None:
            fd = self._take()
            if fd is not None:  # family and type given: no getsockopt calls to find them
                return cls(self.family, socket.SOCK_STREAM, 0, fd), None
        for source in list(self._sources.values()):
            try:
                fd, addr = source._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL, errno.ECONNABORTED):
                    continue  # the slot went to another worker meanwhile
                raise
            return cls(source.family, source.type, source.proto, fd), addr
        return None, None

    def _take(self) -> int | None:
        """One handed-over connection, from what the last record brought or from the link.

        Read one record at a time, when the app asks: what stays in the link is still the
        primary's to give to another worker should this one die."""
        with self._lock:
            if self._closed:
                return None
            queue = self._queue
            if not queue and self._link is not None:
                self._receive()
            if not queue:
                return None
            fd = queue.popleft()
            if not queue and self._signaled:
                self._signaled = False
                _reset(self._wake)
            return fd

    def _receive(self) -> None:
        """Read one record of descriptors from the link (non-blocking), under the lock."""
        try:
            fds = handoff.recv_fds(self._link)  # type: ignore[arg-type]
        except (BlockingIOError, InterruptedError):
            return
        except handoff.LinkError as exc:
            # Out of descriptors (the record arrived cut): its connections are dropped, but the link
            # is whole. Unlinking here would leave the primary handing us connections nobody reads.
            self._dropped(exc.lost)
            return
        except OSError:
            fds = None
        if fds is None:  # the primary's end closed: it has gone
            self._unlink()
            return
        self._queue.extend(fds)
        if len(self._queue) > 1 and not self._signaled:
            self._signaled = True  # the rest stay readable through fileno() until taken
            os.eventfd_write(self._wake, 1)

    def _dropped(self, count: int) -> None:
        """A record's connections were lost to the descriptor limit: say so once, and tell a
        load-aware primary they are closed (it counted them as open here)."""
        if not self._cut_logged:
            self._cut_logged = True
            sys.stderr.write(f"prefork: worker pid {os.getpid()} is out of file descriptors: "
                             f"connections handed to {self.address} were dropped (logged once)\n")
        if self._report and count and self._link is not None:
            try:
                handoff.send_count(self._link, handoff.FINISHED, count)
            except OSError:
                pass

    def _unlink(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            try:
                self._epoll.unregister(link.fileno())
            except (OSError, ValueError):
                pass
            link.close()

    # -- fed by the channel's reader thread ------------------------------------------------------

    def _add_source(self, sid: int, sock: socket.socket) -> None:
        sock.setblocking(False)
        with self._lock:
            if self._closed:
                sock.close()
                return
            self._sources[sid] = sock
            self._epoll.register(sock.fileno(), select.EPOLLIN)

    def _remove_source(self, sid: int) -> None:
        with self._lock:
            sock = self._sources.pop(sid, None)
            if sock is not None:
                self._epoll.unregister(sock.fileno())
                sock.close()

    # -- closing and draining --------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening here; connections handed over but not taken go to another worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            queued, self._queue = list(self._queue), collections.deque()
            if self._link is not None:
                if queued:  # received in a batch, not taken: back to the primary, for the others
                    try:
                        handoff.send_back(self._link, queued)
                        for fd in queued:
                            os.close(fd)
                        queued = []
                    except OSError:
                        pass
                self._unlink()  # what waits in it, the primary gives to another worker
            sources, self._sources = list(self._sources.values()), {}
            os.eventfd_write(self._wake, 1)  # wake a blocked accept()
        for fd in queued:
            os.close(fd)
        for sock in sources:
            sock.close()
        if self._child is not None:
            if self.hid is not None and not self._child.channel.closed:
                # on the channel, so that it takes effect before any message sent after close()
                self._child.channel.send_internal(["x", self.hid])
            self._child.server_closed(self)
        for callback in self.on_close:
            callback()
        self._drained.set()

    def take_pending(self, cls: type[socket.socket] = socket.socket) -> list[tuple[socket.socket, Any]]:
        """Every connection already waiting for this worker, taken at once (non-blocking).

        A draining server serves these before it closes the listener: when the whole cluster
        stops, no other worker could take them, and closing would reset them.
        """
        taken = []
        while not self._closed:
            try:
                conn = self._try_accept(cls)
            except OSError:
                break
            if conn is None:
                break
            taken.append(conn)
        return taken

    def refusing(self) -> bool:
        """Whether the primary has made this listener's sockets refuse new connections (the pool
        stops: binding.refuse_new): its drain then waits for late handshakes (linger.py)."""
        with self._lock:
            sources = list(self._sources.values())
        return any(binding.is_refusing(sock) for sock in sources)

    def wait_pending(self, timeout: float) -> bool:
        """Block until a connection waits on this listener's own sockets, or `timeout` passes."""
        with self._lock:
            sources = list(self._sources.values())
        poller = select.poll()
        try:
            for sock in sources:
                poller.register(sock, select.POLLIN)
            return bool(poller.poll(timeout * 1000))
        except (OSError, ValueError):  # closed meanwhile
            return False

    def drain(self) -> None:
        """Stop taking new connections and let what is being served finish (the owner's way)."""
        if self.drainer is not None:
            self.drainer()
        else:
            self.close()

    def wait_drained(self, timeout: float | None = None) -> bool:
        return self._drained.wait(timeout)

    def report_finished(self, count: int = 1) -> None:
        """Tell a load-aware primary that `count` connections of this listener have closed
        (a no-op for every other policy, so servers may call it whatever the policy)."""
        if not self._report:
            return
        with self._lock:
            if self._link is not None:
                try:
                    handoff.send_count(self._link, handoff.FINISHED, count)
                except OSError:
                    pass

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._epoll.close()
            os.close(self._wake)
            if self._link is not None:
                self._link.close()
        except (OSError, AttributeError, TypeError):
            pass

    def __repr__(self) -> str:
        return f"<prefork.Listener {self.address} {'closed' if self._closed else 'open'}>"


def _reset(efd: int) -> None:
    try:
        os.eventfd_read(efd)
    except BlockingIOError:
        pass


def _peer(sock: socket.socket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return None


# -- listen() ------------------------------------------------------------------------------------


MAX_BACKLOG = 65535


def listen(address: Any, *, backlog: int | None = None, exclusive: bool = False) -> Listener:
    """A server socket shared through the primary (see the module's docstring)."""
    import prefork

    from . import _role

    family, addr = normalize(address)
    if backlog is not None and (not isinstance(backlog, int) or isinstance(backlog, bool)
                                or not 0 <= backlog <= MAX_BACKLOG):
        raise ValueError(f"backlog must be a whole number from 0 to {MAX_BACKLOG}, not {backlog!r}")
    child = _role.child
    if child is None or exclusive:
        return _own_listener(family, addr, backlog, child, reuseport=False)
    policy = prefork.scheduling_policy
    ours, theirs = handoff.pair() if policy in ("rr", "least_conn") else (None, None)
    try:
        listener = child.requests.ask(child.channel, {
            "t": "listen", "family": int(family), "addr": addr, "backlog": backlog, "policy": policy,
        }, lambda reply, fds: _shared_listener(family, child, reply, fds, ours),
            [theirs.fileno(), ours.fileno()] if theirs is not None and ours is not None else None)
    except BaseException:
        if ours is not None:
            ours.close()
        raise
    finally:
        if theirs is not None:
            theirs.close()
    _opened(listener, child)
    return listener


def _shared_listener(family: int, child: Any, reply: dict[str, Any], fds: list[int],
                     link: socket.socket | None) -> Listener:
    """The primary's answer to listen(), on the reader thread: an OSError, or a registered Listener."""
    if reply.get("err"):
        for fd in fds:
            os.close(fd)
        code, message = reply["err"]
        raise OSError(code, message)
    name = reply["name"]
    address = Address.from_sockname(family, name if isinstance(name, str) else tuple(name))
    if reply.get("mode") != "q" and link is not None:
        link.close()
        link = None
    listener = Listener(family, address, reply["h"], child, link)
    listener._report = bool(reply.get("report"))
    for sid, fd in zip(reply.get("slots", []), fds, strict=True):
        listener._add_source(sid, socket.socket(fileno=fd))
    child.listeners[reply["h"]] = listener
    return listener


def _own_listener(family: int, addr: Any, backlog: int | None, child: Any, reuseport: bool) -> Listener:
    """A socket bound by this process itself (in the primary, or `exclusive=True` in a worker)."""
    from .binding import bind_socket

    sock = bind_socket(family, addr, backlog or 511, reuseport=reuseport)
    name = sock.getsockname()
    listener = Listener(family, Address.from_sockname(family, name), None, child)
    listener._add_source(0, sock)
    if child is not None:
        _opened(listener, child)
    return listener


def _opened(listener: Listener, child: Any) -> None:
    child.server_opened(listener)
    listener.on_close.append(lambda: child.listeners.pop(listener.hid, None) if listener.hid else None)
    child.channel.send_internal({"t": "listening", "address": listener.address.to_wire()})
