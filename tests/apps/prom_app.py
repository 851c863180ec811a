"""An ASGI app that uses prometheus_client in its workers, as an app would: a Counter per request
(labelled by path), a Gauge, a Histogram. Each response is the worker's pid, so a test knows who
served it. For tests/test_metrics.py: the primary's /metrics must show one cluster-wide view."""

import os

from prometheus_client import Counter, Gauge, Histogram

from tests.apps.lifespan import lifespan

HITS = Counter("app_hits", "Requests the app saw.", ["path"])
WORKER_PID = Gauge("app_worker_pid", "The pid of the worker (a per-worker gauge).")
SIZES = Histogram("app_body_bytes", "Sizes of the bodies sent.", buckets=(1, 10, 100))


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    WORKER_PID.set(os.getpid())  # not at import: a preloaded app is imported once, by the template
    HITS.labels(path=scope["path"]).inc()
    body = f"{os.getpid()}\n".encode()
    SIZES.observe(len(body))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
