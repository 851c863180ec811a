"""The seed's second example: watch the workers with `online` and `exit`, and replace any that dies.

    .venv/bin/python examples/online_exit.py            # PORT=8000 by default
    curl http://127.0.0.1:8000/
    kill -9 <a worker's pid>                            # it is replaced at once
"""

import os
from http.server import BaseHTTPRequestHandler

import prefork as cluster

PORT = int(os.environ.get("PORT", "8000"))


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello world\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


def start() -> None:
    print("start", flush=True)
    cluster.HTTPServer(("", PORT), Hello).serve_forever()


if cluster.is_master:
    num_workers = os.cpu_count() or 1
    print(f"Master cluster setting up {num_workers} workers...", flush=True)

    for _ in range(num_workers):
        cluster.fork()

    # Every worker the primary starts is watched here.
    @cluster.on("online")
    def on_online(worker) -> None:
        print("worker id = ", worker.id, flush=True)
        print(f"Worker {worker.process.pid} is online", flush=True)

    @cluster.on("exit")
    def on_exit(worker, code, signal) -> None:
        print(f"Worker {worker.process.pid} died with code: {code}, and signal: {signal}", flush=True)
        print("Starting a new worker", flush=True)
        cluster.fork()
else:
    start()
