"""The admin endpoint (`--admin HOST:PORT`): /livez, /readyz, /metrics and /status over HTTP/1.1.

Served by the primary, on its loop thread (loop.py), with non-blocking sockets: an answer there
proves the loop runs (what /livez claims), and the supervisor's state is read where it is owned.
A probe or a scraper is a peer like any other, so everything is bounded: the request head
(MAX_HEAD), the time a connection may take to send it (DEADLINE), the connections open at once
(MAX_CONNECTIONS; past it the oldest one still sending its head is closed, else the oldest one
whose answer waits for its client to read it, so idle clients cannot lock a probe out), and the
requests waiting for a late answer (MAX_WAITING, the scrapes of /metrics: past it a scrape is
answered 503 at once). So the table always has room: /livez and /readyz are always answered.
Every answer ends the connection (`Connection: close`): probes open one per request anyway, and no
keep-alive state is kept.
"""

from __future__ import annotations

import errno
import json
import socket
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Any

from .binding import ACCEPT_RETRY_S, OUT_OF_RESOURCES

MAX_HEAD = 8192
DEADLINE = 5.0
MAX_CONNECTIONS = 64
MAX_WAITING = 16  # requests whose route answers later (scrapes): well under MAX_CONNECTIONS
ACCEPT_BATCH = 64
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}

Payload = bytes | list[bytes]
# reply(status, body, content type); a route calls it once, now or later (on the loop thread)
Reply = Callable[[int, Payload, str], None]


class AdminError(Exception):
    """The admin address cannot be served; the message is for a person."""


def bind(host: str, port: int) -> socket.socket:
    """A listening, non-blocking socket on host:port (raises AdminError with a readable reason)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AdminError(f"cannot serve --admin {where}: {exc.strerror}") from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        why = {errno.EADDRINUSE: "address already in use (another server is listening there)",
               errno.EACCES: "permission denied (ports below 1024 are privileged)",
               errno.EADDRNOTAVAIL: f"{host} is not an address of this machine"}.get(exc.errno or 0)
        raise AdminError(f"cannot serve --admin {where}: {why or exc.strerror}") from None
    sock.setblocking(False)
    return sock


class _Connection:
    __slots__ = ("sock", "head", "out", "timer", "closed", "asked", "waiting")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = bytearray()
        self.out: deque[memoryview] = deque()  # what is left to send
        self.timer: Any = None
        self.closed = False
        self.asked = False  # its head is complete: it is being answered
        self.waiting = False  # its route will answer later


class AdminServer:
    """Serves `routes` (path -> fn(reply)) on a bound socket, on `loop`; see the module docstring."""

    def __init__(self, sock: socket.socket, routes: dict[str, Callable[[Reply], None]],
                 metrics: Any = None) -> None:
        self.sock = sock
        self.routes = routes
        self.metrics = metrics  # metrics.Metrics: attached to the primary when serving starts
        self.loop: Any = None
        self.connections: dict[_Connection, None] = {}  # in the order they came
        self.waiting = 0  # connections whose route answers later
        self.held = False  # a hot upgrade's new primary: not serving until its workers are ready
        host, port = sock.getsockname()[:2]
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self, loop: Any) -> None:
        """Start serving (from any thread: the work is done on the loop's thread)."""
        self.loop = loop
        loop.run_sync(self._start)

    def _start(self) -> None:
        if self.metrics is not None:
            self.metrics.attach()
        if not self.held:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def serve_now(self) -> None:
        """On the loop thread: a held server (upgrade.py) starts serving."""
        if self.held:
            self.held = False
            if self.loop is not None and self.sock.fileno() >= 0:
                self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop serving and close every connection (on the loop when it still runs)."""
        if self.loop is not None:
            try:
                self.loop.run_sync(self._close, timeout=2.0)
                return
            except (TimeoutError, RuntimeError):
                pass
        self._close()

    def hand_over(self) -> None:
        """A hot upgrade's new primary serves the socket now (on the loop thread): stop accepting
        and close this copy, but answer what was accepted here. A head that came already is
        answered at once, before this primary says it drains; the others as their heads come."""
        if self.loop is None:
            self._close()
            return
        self._stop_accepting()
        for conn in list(self.connections):
            if not conn.asked and not conn.closed:
                self._read(conn)

    def _close(self) -> None:
        self._stop_accepting()
        for conn in list(self.connections):
            self._end(conn)

    def _stop_accepting(self) -> None:
        if self.loop is not None and self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    # -- on the loop thread ----------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:  # what waits stays readable: no spinning meanwhile
                    self.loop.remove_reader(self.sock.fileno())
                    self.loop.call_later(ACCEPT_RETRY_S, self._resume)
                return  # else a connection reset before accept: nothing to do
            if len(self.connections) >= MAX_CONNECTIONS and not self._evict():
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Connection(sock)
            self.connections[conn] = None
            conn.timer = self.loop.call_later(DEADLINE, self._end, conn)
            self.loop.add_reader(sock.fileno(), lambda c=conn: self._read(c))

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _evict(self) -> bool:
        """Close the oldest connection that has not sent its whole head yet (a probe sends it at
        once), else the oldest whose answer its client does not read; never one waiting for its
        answer (at most MAX_WAITING of those). A head that is there but not yet read is read and
        answered first."""
        for conn in list(self.connections):
            if not conn.asked:
                self._read(conn)  # a head that came already is answered (a scrape maybe 503) first
                if not conn.closed and not conn.asked:
                    self._end(conn)
                if conn.closed:
                    return True
        for conn in self.connections:
            if conn.out:
                self._end(conn)
                return True
        return False

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(MAX_HEAD + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._end(conn)
            return
        conn.head += data
        end = conn.head.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.head) > MAX_HEAD:
                self._stop_reading(conn)
                self._answer(conn, 431, b"request head too large\n", TEXT, False)
            return
        if end + 4 > MAX_HEAD:
            self._stop_reading(conn)
            self._answer(conn, 431, b"request head too large\n", TEXT, False)
            return
        self._stop_reading(conn)
        self._dispatch(conn, bytes(conn.head[:end]))

    def _stop_reading(self, conn: _Connection) -> None:
        conn.asked = True
        try:
            self.loop.remove_reader(conn.sock.fileno())
        except (ValueError, OSError):
            pass

    def _dispatch(self, conn: _Connection, head: bytes) -> None:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
            self._answer(conn, 400, b"malformed request\n", TEXT, False)
            return
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        body = method != b"HEAD"
        if method not in (b"GET", b"HEAD"):
            self._answer(conn, 405, b"only GET and HEAD\n", TEXT, body, b"Allow: GET, HEAD\r\n")
            return
        route = self.routes.get(target.decode("latin-1"))
        if route is None:
            self._answer(conn, 404, b"not found: try /livez /readyz /metrics /status\n", TEXT, body)
            return

        if self.waiting >= MAX_WAITING and target == b"/metrics":
            self._answer(conn, 503, b"too many scrapes at once\n", TEXT, body, b"Retry-After: 1\r\n")
            return

        def reply(status: int, payload: Payload, kind: str) -> None:
            self._answer(conn, status, payload, kind, body)

        try:
            route(reply)
        except Exception as exc:  # a route's bug costs this answer, never the loop
            self._answer(conn, 500, f"{type(exc).__name__}: {exc}\n".encode(), TEXT, body)
        if not conn.out and not conn.closed:  # it answers later
            conn.waiting = True
            self.waiting += 1

    def _answer(self, conn: _Connection, status: int, payload: Payload, kind: str, body: bool,
                extra: bytes = b"") -> None:
        """Answer; a payload may be a list of parts (a big /metrics), sent without joining them."""
        if conn.closed or conn.out:
            return
        self._unwait(conn)
        parts = [payload] if isinstance(payload, bytes) else payload
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {sum(map(len, parts))}\r\nCache-Control: no-store\r\n"
                "Connection: close\r\n").encode() + extra + b"\r\n"
        conn.out.extend(memoryview(part) for part in ([head, *parts] if body else [head]) if part)
        self._write(conn)

    def _unwait(self, conn: _Connection) -> None:
        if conn.waiting:
            conn.waiting = False
            self.waiting -= 1

    def _write(self, conn: _Connection) -> None:
        if conn.closed:
            return
        out = conn.out
        try:
            sent = conn.sock.sendmsg(list(islice(out, 64)))
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._end(conn)
            return
        while sent:  # drop what went, without copying what is left
            if sent >= len(out[0]):
                sent -= len(out.popleft())
            else:
                out[0] = out[0][sent:]
                sent = 0
        if not out:
            self._end(conn)
        else:  # the rest when the socket takes more
            self.loop.add_writer(conn.sock.fileno(), lambda: self._write(conn))

    def _end(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._unwait(conn)
        self.connections.pop(conn, None)
        if conn.timer is not None:
            conn.timer.cancel()
        fd = conn.sock.fileno()
        if fd >= 0 and self.loop is not None:
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.sock.close()


Scrape = Callable[[Callable[[list[bytes], bool], None]], None]  # metrics.Metrics.scrape


def routes(supervisor: Any, status: Callable[[], dict[str, Any]],
           metrics: Scrape | None) -> dict[str, Callable[[Reply], None]]:
    """The four endpoints over a Supervisor (on its loop thread)."""

    def livez(reply: Reply) -> None:
        alive = sum(1 for m in supervisor.members.values() if not m.worker.is_dead())
        if supervisor.holding:  # serve's first template imports the app: no worker yet, by design
            reply(200, b"ok: the primary's loop answers; the app is being imported\n", TEXT)
        elif alive:
            reply(200, f"ok: the primary's loop answers, {alive} worker(s) alive\n".encode(), TEXT)
        else:
            reply(503, b"no worker is alive\n", TEXT)

    def readyz(reply: Reply) -> None:
        ok, why = supervisor.readiness()
        reply(200 if ok else 503, f"{why}\n".encode(), TEXT)

    def status_route(reply: Reply) -> None:
        reply(200, json.dumps(status()).encode() + b"\n", JSON)

    table = {"/livez": livez, "/readyz": readyz, "/status": status_route}
    if metrics is not None:
        table["/metrics"] = lambda reply: metrics(
            lambda text, ok: reply(200, text, PROMETHEUS) if ok else reply(500, text, TEXT))
    return table


def open_admin(address: list[Any] | None, supervisor: Any,
               status: Callable[[], dict[str, Any]]) -> AdminServer | None:
    """The admin server for `--admin` (["tcp", host, port]), bound but not yet serving; None when off.
    Raises AdminError (in use, bad host) before any worker is started."""
    if not address:
        return None
    from .metrics import Metrics
    from .upgrade import take_admin

    # a hot upgrade's new primary serves the previous primary's socket for the same address (upgrade.py)
    sock = take_admin(address[1], address[2]) or bind(address[1], address[2])
    metrics = Metrics(supervisor)
    return AdminServer(sock, routes(supervisor, status, metrics.scrape), metrics)
