"""The seed's cluster.js + app.js: one worker per core, each serving "hello world" on one shared port.

    .venv/bin/python examples/hello_cluster.py          # PORT=8000 by default
    curl http://127.0.0.1:8000/

The primary forks one worker per CPU and then just keeps running while they do (as Node's does); each
worker prints "start" and serves HTTP on the same port, which the primary shares among them.
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

    def log_message(self, format: str, *args: object) -> None:  # quiet, as the Node example
        pass


def start() -> None:
    """app.js's start(): print "start" and serve on PORT."""
    print("start", flush=True)
    cluster.HTTPServer(("", PORT), Hello).serve_forever()


if cluster.is_master:
    for _ in range(os.cpu_count() or 1):
        cluster.fork()
else:
    start()
