"""A WSGI app with one path per behaviour of the WSGI bridge (tests/test_wsgi_serve.py). Run it with
one worker: the counters it reports are per process."""

import sys
import threading
import time

_lock = threading.Lock()
_state = {"closed": 0, "running": 0, "max_running": 0}


class _Closing:
    """An iterable whose close() the server must call (PEP 3333)."""

    def __init__(self, parts):
        self.parts = parts

    def __iter__(self):
        return iter(self.parts)

    def close(self):
        with _lock:
            _state["closed"] += 1


def _boom_iter(first):
    yield first
    raise RuntimeError("boom in the iterable")


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/echo":
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path == "/stream":  # more than the bridge gathers, no Content-Length: chunked, in parts
        n, size = 8, 100_000
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return (bytes([65 + i]) * size for i in range(n))
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"one,")
        write(b"two,")
        return [b"three"]
    if path == "/closing":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _Closing([b"a", b"b"])
    if path == "/closed":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(_state["closed"]).encode()]
    if path == "/boom":
        raise RuntimeError("boom in the app")
    if path == "/boom-late":  # nothing sent yet when it fails: still a 500
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _boom_iter(b"partial")
    if path == "/boom-streamed":  # fails after the response started: the connection is cut
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _boom_iter(b"x" * 300_000)
    if path == "/exc-info":
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("changed my mind")
        except ValueError:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"sorry"]
    if path == "/sleep":
        with _lock:
            _state["running"] += 1
            _state["max_running"] = max(_state["max_running"], _state["running"])
        time.sleep(0.3)
        with _lock:
            _state["running"] -= 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"slept"]
    if path == "/user":  # what a proxy in front would have set (tests/test_wsgi_serve.py)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [repr(environ.get("HTTP_X_REMOTE_USER")).encode()]
    if path == "/max-running":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(_state["max_running"]).encode()]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "12"),
                              ("X-Query", environ["QUERY_STRING"])])
    return [b"hello world\n"]
