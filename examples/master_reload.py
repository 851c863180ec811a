"""The seed's master.js: reload with no downtime on SIGHUP.

    .venv/bin/python examples/master_reload.py          # PORT=8000 by default
    kill -HUP <the primary's pid>                       # prints "Reloading..."

The primary forks one worker. On SIGHUP it forks a new one and, once that one is listening (not
merely online: FACTS.md), sends SIGTERM to all the others, which then finish what they serve and
leave. The shared port stays open in the primary the whole time: no request is refused or dropped.
"""

import os
import signal
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


if cluster.is_master:
    print(f"started master with {os.getpid()}", flush=True)

    # A new worker process.
    cluster.fork()

    def on_sighup(signum: int, frame: object) -> None:
        print("Reloading...", flush=True)
        new_worker = cluster.fork()

        def on_listening(address: object) -> None:
            # Stop every other worker.
            for wid, worker in list(cluster.workers.items()):
                if wid == new_worker.id:
                    continue
                worker.kill("SIGTERM")

        new_worker.once("listening", on_listening)

    signal.signal(signal.SIGHUP, on_sighup)
else:
    # SIGTERM from the primary: leave gracefully, so the request being served is answered and the
    # connections waiting for this worker go to the new one (the seed's worker just dies).
    signal.signal(signal.SIGTERM, lambda signum, frame: cluster.worker.disconnect())
    print(f"worker {cluster.worker.id} started with {os.getpid()}", flush=True)
    cluster.ThreadingHTTPServer(("", PORT), Hello).serve_forever()
    print(f"worker {cluster.worker.id} stopped", flush=True)
