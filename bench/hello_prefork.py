"""The seed's hello world on prefork, for benches: the counterpart of bench/node/hello.js.

    WORKERS=2 PORT=8000 PREFORK_SCHED_POLICY=rr python bench/hello_prefork.py

Workers answer every request with "hello world\\n" from a small uvloop protocol fed by a
prefork Listener (so the bench measures prefork's hand-off, not a slow HTTP parser). A request
for /slow first burns SLOW_MS of CPU (uneven work, for the load-aware policy). Prints "ready" once
every worker listens; on SIGTERM prints one JSON line with per-worker connection and request counts.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import prefork as cluster

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nContent-Type: text/plain\r\n\r\nhello world\n"
CLOSE_RESPONSE = RESPONSE.replace(b"Content-Length", b"Connection: close\r\nContent-Length")
SLOW_S = float(os.environ.get("SLOW_MS", "20")) / 1000


def primary() -> None:
    workers = int(os.environ.get("WORKERS", "2"))
    counts: dict[int, dict[str, int]] = {}
    listening: set[int] = set()

    def on_listening(worker: cluster.Worker, address: object) -> None:  # type: ignore[name-defined]
        listening.add(worker.id)
        if len(listening) == workers:
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
    for _ in range(workers):
        cluster.fork()


def worker() -> None:
    import asyncio

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    stats = {"connections": 0, "requests": 0}
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cluster.worker.on("message", lambda m, h: cluster.worker.send(stats))

    class Hello(asyncio.Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self.transport = transport
            self.buf = b""
            stats["connections"] += 1

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while b"\r\n\r\n" in self.buf:
                head, self.buf = self.buf.split(b"\r\n\r\n", 1)
                stats["requests"] += 1
                if head.startswith(b"GET /slow"):
                    end = time.perf_counter() + SLOW_S
                    while time.perf_counter() < end:
                        pass
                if b"onnection: close" in head or b"onnection: Close" in head:
                    self.transport.write(CLOSE_RESPONSE)
                    self.transport.close()
                    return
                self.transport.write(RESPONSE)

        def connection_lost(self, exc: Exception | None) -> None:
            listener.report_finished(1)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def on_ready() -> None:
            while True:
                try:
                    sock, _ = listener.accept()
                except (BlockingIOError, OSError):
                    return
                sock.setblocking(False)
                loop.create_task(loop.connect_accepted_socket(Hello, sock))

        loop.add_reader(listener.fileno(), on_ready)
        await asyncio.Event().wait()

    listener = cluster.listen(("127.0.0.1", int(os.environ.get("PORT", "8000"))))
    listener.setblocking(False)
    asyncio.run(main())


if __name__ == "__main__":
    if cluster.is_primary:
        primary()
    else:
        worker()
        sys.exit(0)
