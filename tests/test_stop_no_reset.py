"""A stop under load resets no connection: the primary makes the kernel stop starting connections
on its listening sockets (binding.refuse_new), the workers serve what is queued, and only then does
the last copy of each socket close. A client that connects during the stop is refused, never reset
after sending its request. (Before: `prefork serve` with its default policy, reuseport, reset a few
connections at every SIGTERM under load, those queued on sockets nobody accepted from any more.)"""

from __future__ import annotations

import ctypes
import http.client
import signal
import socket
import struct
import threading
import time

import pytest
from cli_helpers import free_port, prefork_cmd  # noqa: F401

from prefork.address import Address
from prefork.binding import _DROP_SYN, SO_ATTACH_FILTER, accept_new, bind_socket, is_refusing, refuse_new
from prefork.servers import Listener


class FreshLoad:
    """Client threads each sending requests one after the other, each on a new connection."""

    def __init__(self, port: int, threads: int = 8) -> None:
        self.port = port
        self.ok = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/", headers={"Connection": "close"})
                assert conn.getresponse().read() == b"hello world\n"
                conn.close()
                with self._lock:
                    self.ok += 1
            except Exception as exc:  # counted: the test asserts which kinds there are
                with self._lock:
                    self.errors.append(repr(exc))
                time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("app,policy", [("tests.apps.hello:asgi", None), ("tests.apps.hello:wsgi", "none")])
def test_sigterm_under_load_refuses_and_never_resets(prefork_cmd, app, policy) -> None:  # noqa: F811
    port = free_port()
    cmd = prefork_cmd("serve", app, "--bind", f"127.0.0.1:{port}", "--workers", "2",
                      *(("--policy", policy) if policy else ()))
    cmd.wait_ready()
    load = FreshLoad(port)
    try:
        time.sleep(0.5)
        served = load.ok
        cmd.proc.send_signal(signal.SIGTERM)
        assert cmd.finish(20) == 0, cmd.output
    finally:
        load.stop()
    assert served > 20, (served, load.errors[:3])
    assert load.errors, "no client connected after the stop: the test proves nothing"
    assert all("ConnectionRefused" in e for e in load.errors), load.errors[:5]


def test_refuse_new_keeps_the_queue_and_starts_nothing_new() -> None:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            listener = socket.socket(family)
            listener.bind((host, 0))
        except OSError:  # no IPv6 here
            continue
        with listener:
            listener.listen(16)
            address = listener.getsockname()[:2]
            queued = socket.create_connection(address, 5)
            assert refuse_new(listener)
            with pytest.raises(TimeoutError):  # the SYN goes unanswered: no handshake completes
                socket.create_connection(address, 0.3)
            listener.settimeout(5)
            served, _ = listener.accept()  # what was queued before stays
            with queued, served:
                queued.sendall(b"ping")
                served.settimeout(5)
                assert served.recv(4) == b"ping"
        with pytest.raises(ConnectionRefusedError):  # closed: refused, not reset
            socket.create_connection(address, 5)
    with socket.socket(socket.AF_UNIX) as unix:
        assert not refuse_new(unix)  # a unix socket's connect() passes no filter


def test_a_listener_says_when_it_refuses_and_waits_for_a_late_handshake() -> None:
    """A drain keeps taking from a listener whose sockets refuse new connections (the pool stops),
    because a handshake under way when the filter went on completes later on a busy machine
    (servers.py: Listener.refusing, wait_pending; the servers' drains use them). Here the late
    handshake is made by lifting the filter while wait_pending waits, so a new connect completes."""
    sock = bind_socket(socket.AF_INET, ("127.0.0.1", 0), 16)
    listener = Listener(socket.AF_INET, Address.from_sockname(socket.AF_INET, sock.getsockname()), None, None)
    listener._add_source(0, sock)
    address = sock.getsockname()
    clients: list[socket.socket] = []
    with listener:
        assert not listener.refusing()
        assert refuse_new(sock) and is_refusing(sock) and listener.refusing()
        assert not listener.wait_pending(0.05)  # nothing under way: nothing lands
        waiting = threading.Event()

        def late() -> None:
            waiting.wait(10)
            accept_new(sock)  # what a late handshake looks like to the listener: it lands now
            clients.append(socket.create_connection(address, 5))

        thread = threading.Thread(target=late)
        thread.start()
        try:
            waiting.set()
            assert listener.wait_pending(10)  # woken by the late connection, long before 10 s
            taken = listener.take_pending()
            assert len(taken) == 1, taken
            taken[0][0].close()
            assert not listener.refusing()
        finally:
            thread.join(10)
            for conn in clients:
                conn.close()


def _late_client(listener: Listener, reply: list[bytes]) -> threading.Thread:
    """A thread that makes a handshake land late on `listener`'s refusing socket (by lifting the
    filter) and sends one GET; what it reads goes to `reply` (b"refused" if nobody listens)."""
    source = next(iter(listener._sources.values()))
    address = listener.getsockname()

    def run() -> None:
        time.sleep(0.1)  # the drain has begun and lingers (its quiet window is 1 s here)
        accept_new(source)
        try:
            with socket.create_connection(address, 5) as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                conn.settimeout(5)
                reply.append(conn.recv(100))
        except ConnectionRefusedError:
            reply.append(b"refused")

    return threading.Thread(target=run)


@pytest.mark.timeout(30)
def test_an_asyncio_servers_drain_serves_a_late_handshake(monkeypatch) -> None:
    """prefork.start_server's drain (aio.py, linger.py) keeps a refusing listener while late
    handshakes land."""
    import asyncio

    import prefork as cluster
    from prefork import linger

    monkeypatch.setattr(linger, "LINGER_S", 1.0)  # a test process slowed by other load still lands in it
    reply: list[bytes] = []

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await cluster.start_server(handle, "127.0.0.1", 0)
        listener = server.sockets[0]
        assert refuse_new(next(iter(listener._sources.values())))
        client = _late_client(listener, reply)
        listener.drain()
        client.start()
        try:
            await asyncio.wait_for(server.wait_closed(), 15)
        finally:
            client.join(10)

    asyncio.run(main())
    assert reply and reply[0].startswith(b"HTTP/1.1 200"), reply


@pytest.mark.timeout(30)
def test_a_threading_servers_drain_serves_a_late_handshake(monkeypatch) -> None:
    """prefork.ThreadingHTTPServer's drain (httpserver.py, linger.py) does the same."""
    from http.server import BaseHTTPRequestHandler

    import prefork as cluster
    from prefork import linger

    monkeypatch.setattr(linger, "LINGER_S", 1.0)

    class Hello(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = cluster.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    reply: list[bytes] = []
    try:
        assert refuse_new(next(iter(server.socket._sources.values())))
        client = _late_client(server.socket, reply)
        client.start()
        server.drain()  # returns when the linger ends: after the late one was taken
        client.join(10)
        assert server.wait_drained(10)
    finally:
        server.shutdown()
        serving.join(10)
        server.server_close()
    assert reply and reply[0].startswith(b"HTTP/1.0 200"), reply


def test_another_programs_longer_filter_is_not_taken_for_ours() -> None:
    """A longer filter that begins as ours is not taken for ours: is_refusing reads the filter
    with room for ours only (SO_GET_FILTER counts its room in 8-byte blocks), and the kernel
    refuses to copy a longer one. (That it writes nothing past the room, this test cannot see.)"""
    longer = _DROP_SYN + struct.pack("HBBI", 0x06, 0, 0, 0xFFFFFFFF) * 60  # 65 blocks
    with socket.socket(socket.AF_INET) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        program = ctypes.create_string_buffer(longer, len(longer))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                        struct.pack("HP", len(longer) // 8, ctypes.addressof(program)))
        assert not is_refusing(sock)
        accept_new(sock)
        assert refuse_new(sock) and is_refusing(sock)


RELISTEN = r"""
import os, socket, sys
import prefork as cluster

cluster.scheduling_policy = os.environ["POLICY"]
if cluster.is_primary:
    state = {"n": 0}

    def listening(worker, address):
        state["n"] += 1
        if state["n"] == 1:  # the stop begins, and a new worker listens while the old one drains
            cluster.disconnect()
            cluster.fork()
        else:
            print("listening", address.port, flush=True)

    cluster.on("listening", listening)
    cluster.fork()
elif cluster.worker.id == 1:  # it keeps its listener through the stop: the address stays shared
    listener = cluster.listen(("127.0.0.1", int(os.environ["PORT"])))
    listener.drainer = lambda: None
    import threading
    threading.Event().wait()
else:
    server = cluster.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), HelloHandler)
    server.serve_forever()
"""

HANDLER = r"""
from http.server import BaseHTTPRequestHandler


class HelloHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["none", "rr"])
def test_a_worker_that_listens_after_a_stop_began_is_served(py, policy) -> None:
    """disconnect(), then fork() while a worker still listens: the new worker shares the address
    again (none: the same socket), so a socket that was refusing new connections accepts again."""
    port = free_port()
    script = py.spawn(RELISTEN.replace("import prefork as cluster", HANDLER + "import prefork as cluster"),
                      env={"POLICY": policy, "PORT": str(port)})
    script.expect(r"listening (\d+)", timeout=20)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"ok"
    conn.close()
    script.signal("SIGTERM")
    script.finish()
