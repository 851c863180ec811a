"""The server adapters: HTTPServer, ThreadingHTTPServer, start_server() and create_server().

Each test runs a real cluster whose workers serve HTTP with one of the four adapters ("kinds"), and
talks to it with http.client over 127.0.0.1: sharing, connections that behave as if accepted
locally, TLS, the graceful drain on disconnect, and the load reports least_conn relies on.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest
from conftest import wait_until

KINDS = ["http", "threading", "streams", "protocol"]

APP = r"""
import asyncio, os, signal, socket, ssl, sys, time
from http.server import BaseHTTPRequestHandler
import prefork as cluster
from prefork import _role

KIND = os.environ["T_KIND"]
if os.environ.get("T_POLICY_ATTR"):
    cluster.scheduling_policy = os.environ["T_POLICY_ATTR"]


def body_for(path, peer, sock):
    if path == "/peer":
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        return f"{peer[0]}:{peer[1]}"
    return str(cluster.worker.id)


if cluster.is_primary:
    cluster.on("listening", lambda w, a: print("listening", w.id, w.process.pid, a.port, flush=True))
    cluster.on("exit", lambda w, code, sig: print("exit", w.id, code, sig, flush=True))
    started = {}

    @cluster.on("message")
    def on_message(worker, message, handle):
        if message == "disconnect-me":
            started[worker.id] = time.monotonic()
            print("disconnecting", worker.id, flush=True)
            worker.disconnect()

    if os.environ.get("T_DISCONNECT_AT_ONCE"):
        @cluster.on("listening")
        def at_once(worker, address):
            time.sleep(0.3)  # serve_forever() is now waiting in its select()
            started[worker.id] = time.monotonic()
            worker.disconnect()

        @cluster.on("exit")
        def took(worker, code, sig):
            print(f"drain took {time.monotonic() - started[worker.id]:.3f}", flush=True)

    def print_load(signum, frame):
        def report():
            load = 0
            for handle in _role.primary.servers.by_id.values():
                for wid in handle.workers:
                    load += handle.load(wid)
            print("load", load, flush=True)
        _role.primary.post(report)
    signal.signal(signal.SIGUSR1, print_load)

    for _ in range(int(os.environ.get("T_WORKERS", "2"))):
        cluster.fork()
else:
    ctx = None
    if os.environ.get("T_CERT"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.environ["T_CERT"], os.environ["T_KEY"])

    if KIND in ("http", "threading"):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                if self.path == "/slow":
                    cluster.worker.send("disconnect-me")
                    time.sleep(1.5)
                body = body_for(self.path, self.client_address, self.request).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        cls = cluster.HTTPServer if KIND == "http" else cluster.ThreadingHTTPServer
        server = cls(("127.0.0.1", 0), Handler, ssl_context=ctx)
        server.serve_forever(poll_interval=float(os.environ.get("T_POLL", "0.5")))
    else:
        async def respond(path, peer, sock):
            if path == "/slow":
                cluster.worker.send("disconnect-me")
                await asyncio.sleep(1.5)
            body = body_for(path, peer, sock).encode()
            return (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)) + body

        async def on_client(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split()[1].decode()
            writer.write(await respond(path, writer.get_extra_info("peername"),
                                       writer.get_extra_info("socket")))
            await writer.drain()
            writer.close()

        class Proto(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport, self.buf = transport, b""

            def data_received(self, data):
                self.buf += data
                if b"\r\n\r\n" in self.buf:
                    asyncio.ensure_future(self.answer(self.buf.split()[1].decode()))

            async def answer(self, path):
                t = self.transport
                t.write(await respond(path, t.get_extra_info("peername"), t.get_extra_info("socket")))
                t.close()

        async def main():
            if KIND == "streams":
                server = await cluster.start_server(on_client, "127.0.0.1", 0, ssl=ctx)
            else:
                server = await cluster.create_server(Proto, "127.0.0.1", 0, ssl=ctx)
            assert server.sockets and server.sockets[0].getsockname()[1] > 0
            async with server:
                await server.serve_forever()

        asyncio.run(main())
    print("serve_forever returned", cluster.worker.id, flush=True)
"""


def _ports(script, count: int) -> dict[int, int]:
    def found() -> dict[int, int]:
        out = {}
        for line in script.lines():
            if line.startswith("listening "):
                _, wid, pid, port = line.split()
                out[int(wid)] = int(port)
                script.track(int(pid))
        return out

    if not wait_until(lambda: len(found()) >= count, 15):
        pytest.fail(f"workers did not listen\n--- stdout\n{script.stdout}--- stderr\n{script.stderr}")
    return found()


def _get(port: int, path: str = "/", context: ssl.SSLContext | None = None,
         timeout: float = 10) -> tuple[int, str]:
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def _get_many(port: int, n: int, threads: int = 6, **kw: object) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    lock = threading.Lock()

    def run(k: int) -> None:
        for _ in range(k):
            result = _get(port, **kw)  # type: ignore[arg-type]
            with lock:
                out.append(result)

    pool = [threading.Thread(target=run, args=(n // threads,)) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(30)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_served_by_every_worker(py, kind):
    script = py.spawn(APP, env={"T_KIND": kind})
    port = set(_ports(script, 2).values())
    assert len(port) == 1
    results = _get_many(port.pop(), 30)
    assert len(results) == 30 and {status for status, _ in results} == {200}
    assert {body for _, body in results} == {"1", "2"}
    script.signal("SIGINT")
    script.finish()


@pytest.mark.parametrize("kind", KINDS)
def test_connection_behaves_as_accepted_locally(py, kind):
    script = py.spawn(APP, env={"T_KIND": kind})
    port = _ports(script, 2)[1]
    for _ in range(4):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.connect()
        me = conn.sock.getsockname()
        conn.request("GET", "/peer")
        resp = conn.getresponse()
        assert resp.status == 200  # the handler's setsockopt/getsockopt worked
        assert resp.read().decode() == f"{me[0]}:{me[1]}"  # getpeername() is the client
        conn.close()
    script.signal("SIGINT")
    script.finish()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    return str(cert), str(key)


@pytest.mark.parametrize("kind", KINDS)
def test_tls(py, kind, certificate):
    cert, key = certificate
    script = py.spawn(APP, env={"T_KIND": kind, "T_CERT": cert, "T_KEY": key})
    port = _ports(script, 2)[1]
    client = ssl.create_default_context(cafile=cert)
    results = _get_many(port, 12, threads=3, context=client)
    assert {r for r in results} == {(200, "1"), (200, "2")}
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)):
        _get(port, context=ssl.create_default_context())  # unknown CA: the handshake really happens
    assert _get(port, context=client)[0] == 200  # a failed handshake did not hurt the server
    script.signal("SIGINT")
    script.finish()


@pytest.mark.parametrize("kind", KINDS)
def test_disconnect_lets_the_request_in_flight_finish(py, kind):
    script = py.spawn(APP, env={"T_KIND": kind, "T_WORKERS": "1"})
    port = _ports(script, 1)[1]
    idle = None
    if kind == "threading":  # an idle keep-alive connection must not hold the drain
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        idle.request("GET", "/")
        assert idle.getresponse().read() == b"1"
    t0 = time.monotonic()
    assert _get(port, "/slow") == (200, "1")  # answered although the worker was asked to go
    took = time.monotonic() - t0
    assert 1.4 < took < 5, took
    script.expect(r"^disconnecting 1$")
    result = script.finish(timeout=10)  # the worker ended, so did the primary (nothing left to do)
    assert result.returncode == 0, result
    assert "serve_forever returned 1" in result.stdout
    assert "exit 1 0 None" in result.stdout
    assert "Traceback" not in result.stderr and "CancelledError" not in result.stderr, result.stderr
    if idle is not None:
        assert idle.sock.recv(1) == b""  # the server closed the idle keep-alive connection
        idle.close()


@pytest.mark.parametrize("kind", ["http", "threading"])
def test_serve_forever_returns_at_once_on_disconnect(py, kind):
    """Not after its poll interval (5 s here): closing the listener wakes it."""
    script = py.spawn(APP, env={"T_KIND": kind, "T_WORKERS": "1", "T_POLL": "5",
                                "T_DISCONNECT_AT_ONCE": "1"})
    result = script.finish(timeout=15)
    assert result.returncode == 0, result
    took = float(script.expect(r"^drain took ([\d.]+)$")[1])
    assert took < 2.5, result
    assert "serve_forever returned 1" in result.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_least_conn_load_follows_open_connections(py, kind):
    """Workers report closed connections, so the primary's count of open ones goes back to 0."""
    script = py.spawn(APP, env={"T_KIND": kind, "T_POLICY_ATTR": "least_conn"})
    port = _ports(script, 2)[1]
    assert len(_get_many(port, 12)) == 12

    def load() -> int:
        start = len(script.lines())
        script.signal("SIGUSR1")
        return int(script.expect(r"^load (\d+)$", start=start)[1])

    assert wait_until(lambda: load() == 0, 10)  # 12 served and closed: nothing open
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    assert wait_until(lambda: load() == 3, 10)
    for s in held:
        s.close()
    assert wait_until(lambda: load() == 0, 10)
    script.signal("SIGINT")
    script.finish()
