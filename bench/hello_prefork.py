"""The seed's hello world on prefork, for benches: the counterpart of bench/node/hello.js.

    WORKERS=2 PORT=8000 PREFORK_SCHED_POLICY=rr python bench/hello_prefork.py

Workers answer every request with "hello world\\n" from a small uvloop protocol fed by a
prefork Listener (so the bench measures prefork's hand-off, not a slow HTTP parser). A request
for /slow first burns SLOW_MS of CPU (uneven work, for the load-aware policy). Prints "ready" once
every worker listens; on SIGTERM prints one JSON line with per-worker connection and request counts.

MODE=supervised runs the workers under prefork's Supervisor instead (the counterpart of
bench/node/reload_master.js): SIGHUP is a rolling reload ("reloaded" is printed when done), a
killed worker is replaced, and JSON lines {"event", "t", "pid", "id"} report online/listening.
START=fork forks workers from the primary instead of starting fresh interpreters.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import prefork as cluster

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nContent-Type: text/plain\r\n\r\nhello world\n"
CLOSE_RESPONSE = RESPONSE.replace(b"Content-Length", b"Connection: close\r\nContent-Length")
SLOW_S = float(os.environ.get("SLOW_MS", "20")) / 1000
WORKERS = int(os.environ.get("WORKERS", "2"))
IDLE_GRACE = 2.0  # a draining worker closes keep-alive connections idle this long


def primary() -> None:
    counts: dict[int, dict[str, int]] = {}
    listening: set[int] = set()

    def on_listening(worker: object, address: object) -> None:
        listening.add(worker.id)  # type: ignore[attr-defined]
        if len(listening) == WORKERS:
            print("ready", flush=True)

    def on_message(worker: object, message: dict[str, int], handle: object) -> None:
        counts[worker.id] = message  # type: ignore[attr-defined]
        if len(counts) == len(cluster.workers):
            print(json.dumps({
                "per_worker_connections": [c["connections"] for c in counts.values()],
                "per_worker_requests": [c["requests"] for c in counts.values()],
            }), flush=True)
            for w in list(cluster.workers.values()):
                w.kill("SIGKILL")

    cluster.on("listening", on_listening)
    cluster.on("message", on_message)
    signal.signal(signal.SIGTERM, lambda *_: [w.send("counts") for w in list(cluster.workers.values())])
    for _ in range(WORKERS):
        cluster.fork()


def supervised_primary() -> int:
    def event(name: str, worker: object) -> None:
        w = worker
        line = {"event": name, "t": time.monotonic() * 1000, "pid": w.process.pid, "id": w.id}  # type: ignore
        print(json.dumps(line), flush=True)

    ready: set[int] = set()

    def on_listening(worker: object, address: object) -> None:
        event("listening", worker)
        ready.add(worker.id)  # type: ignore[attr-defined]
        if len(ready) == WORKERS:
            print("ready", flush=True)

    def log(line: str) -> None:
        sys.stderr.write(f"[prefork] {line}\n")
        if line == "reload done":
            print("reloaded", flush=True)

    cluster.on("online", lambda w: event("online", w))
    cluster.on("listening", on_listening)
    if os.environ.get("START") == "fork":
        import asyncio  # noqa: F401 - preload what the workers use, as an app preloaded in the primary

        try:
            import uvloop  # noqa: F401
        except ImportError:
            pass
        cluster.setup_primary(start="fork", target=worker)
    supervisor = cluster.supervise(WORKERS, graceful_timeout=10, on_log=log)
    return supervisor.wait()


def worker() -> None:
    import asyncio

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    stats = {"connections": 0, "requests": 0}
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if cluster.is_worker:
        cluster.worker.on("message", lambda m, h: cluster.worker.send(stats))
    conns: set[Hello] = set()
    drained = threading.Event()
    state = {"draining": False}
    starting = [0]  # accepted connections whose protocol is not made yet

    class Hello(asyncio.Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self.transport = transport
            self.buf = b""
            self.last = time.monotonic()
            conns.add(self)
            stats["connections"] += 1

        def data_received(self, data: bytes) -> None:
            self.buf += data
            self.last = time.monotonic()
            while b"\r\n\r\n" in self.buf:
                head, self.buf = self.buf.split(b"\r\n\r\n", 1)
                stats["requests"] += 1
                if head.startswith(b"GET /slow"):
                    end = time.perf_counter() + SLOW_S
                    while time.perf_counter() < end:
                        pass
                if state["draining"] or b"onnection: close" in head or b"onnection: Close" in head:
                    self.transport.write(CLOSE_RESPONSE)
                    self.transport.close()
                    return
                self.transport.write(RESPONSE)

        def connection_lost(self, exc: Exception | None) -> None:
            conns.discard(self)
            listener.report_finished(1)
            if state["draining"] and not conns and not starting[0]:
                drained.set()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def on_ready() -> None:
            while True:
                try:
                    sock = listener.accept_socket()
                except (BlockingIOError, OSError):
                    return
                connect(sock)

        def connect(sock: object) -> None:
            """Served from the next loop turn; counted until then, so a drain waits for it."""
            sock.setblocking(False)  # type: ignore[attr-defined]
            starting[0] += 1
            task = loop.create_task(loop.connect_accepted_socket(Hello, sock))  # type: ignore[arg-type]
            task.add_done_callback(lambda _: starting.__setitem__(0, starting[0] - 1))

        def drain() -> None:
            """Stop accepting; answer the next request on each connection with Connection: close."""
            state["draining"] = True
            loop.remove_reader(listener.fileno())
            for sock, _ in listener.take_pending():
                connect(sock)
            listener.close()
            loop.call_later(IDLE_GRACE, close_idle)
            if not conns and not starting[0]:
                drained.set()
                done.set()

        def close_idle() -> None:
            for conn in list(conns):
                conn.transport.close()
            drained.set()
            done.set()

        listener.drainer = lambda: loop.call_soon_threadsafe(drain)
        listener.wait_drained = lambda timeout=None: drained.wait(timeout)  # type: ignore[method-assign]
        loop.add_reader(listener.fileno(), on_ready)
        listener.set_eager()  # on_ready takes all that waits
        await done.wait()

    listener = cluster.listen(("127.0.0.1", int(os.environ.get("PORT", "8000"))))
    listener.setblocking(False)
    asyncio.run(main())


if __name__ == "__main__":
    if cluster.is_primary:
        if os.environ.get("MODE") == "supervised":
            sys.exit(supervised_primary())
        primary()
    else:
        worker()
