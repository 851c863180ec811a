"""The seed's restartWorkers(): ask every worker to shut down, force the stragglers, and replace them.

    .venv/bin/python examples/restart_workers.py        # PORT=8000 by default
    kill -USR2 <the primary's pid>                      # restart every worker

Each worker gets {"text": "shutdown", "from": "master"} and exits on it; one that is still there
5 seconds later is killed with SIGKILL (the seed's setTimeout is a threading.Timer here). Every exit
is answered by a new worker, so the port keeps being served.
"""

import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler

import prefork as cluster

PORT = int(os.environ.get("PORT", "8000"))


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = f"hello from worker {cluster.worker.id} (pid {os.getpid()})\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def restart_workers() -> None:
    for wid in list(cluster.workers):
        cluster.workers[wid].send({"text": "shutdown", "from": "master"})

        def force(wid: int = wid) -> None:
            worker = cluster.workers.get(wid)
            if worker is not None and not worker.is_dead():
                worker.kill("SIGKILL")

        timer = threading.Timer(5.0, force)
        timer.daemon = True
        timer.start()


if cluster.is_master:
    print(f"started master with {os.getpid()}", flush=True)
    for _ in range(os.cpu_count() or 1):
        cluster.fork()

    @cluster.on("exit")
    def on_exit(worker, code, signal) -> None:
        print(f"Worker {worker.process.pid} died with code: {code}, and signal: {signal}", flush=True)
        cluster.fork()

    signal.signal(signal.SIGUSR2, lambda signum, frame: restart_workers())
else:
    def on_message(message: object, handle: object = None) -> None:
        if isinstance(message, dict) and message.get("text") == "shutdown":
            print(f"worker {cluster.worker.id} shutting down", flush=True)
            sys.exit(0)

    cluster.worker.on("message", on_message)
    print(f"worker {cluster.worker.id} started with {os.getpid()}", flush=True)
    cluster.HTTPServer(("", PORT), Hello).serve_forever()
