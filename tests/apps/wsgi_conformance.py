"""A WSGI app for tests/test_wsgi_conformance.py: wsgi.file_wrapper, wsgi.input read in every PEP 3333
way, SCRIPT_NAME/PATH_INFO. Every app-side read passes a size (wsgiref.validate asks it). Run it with
one worker: the counters it reports are per process."""

import hashlib
import json
import os
import tempfile
import threading

_lock = threading.Lock()
_state = {"reads": 0, "last": ""}
_files: dict[int, str] = {}


def pattern(size):
    """The bytes of /file?size=N (the test checks them)."""
    block = bytes(range(256)) * 256
    return (block * (size // len(block) + 1))[:size]


def _file(size):
    with _lock:
        if size not in _files:
            fd, path = tempfile.mkstemp(prefix="prefork-filewrapper-")
            with os.fdopen(fd, "wb") as f:
                f.write(pattern(size))
            _files[size] = path
        return _files[size]


class Counting:
    """A file whose read() calls are counted: sendfile never calls it."""

    def __init__(self, f):
        self.f = f
        self.name = f.name  # Django's FileResponse: the type and Content-Length from it

    def read(self, n=-1):
        with _lock:
            _state["reads"] += 1
        return self.f.read(n)

    def fileno(self):
        return self.f.fileno()

    def tell(self):
        return self.f.tell()

    def seek(self, offset, whence=0):
        return self.f.seek(offset, whence)

    def close(self):
        self.f.close()


def _query(environ):
    return dict(p.split("=", 1) for p in environ.get("QUERY_STRING", "").split("&") if "=" in p)


def _text(start_response, body, status="200 OK"):
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def app(environ, start_response):
    path = environ["PATH_INFO"]
    q = _query(environ)
    if path == "/file":  # ?size=N&skip=K&length=0
        size, skip = int(q.get("size", "100000")), int(q.get("skip", "0"))
        f = open(_file(size), "rb")  # noqa: SIM115 -- the server closes it (file_wrapper.close)
        f.seek(skip)
        headers = [("Content-Type", "application/octet-stream")]
        if q.get("length", "1") == "1":
            headers.append(("Content-Length", str(size - skip)))
        start_response("200 OK", headers)
        return environ["wsgi.file_wrapper"](Counting(f), 32768)
    if path == "/reads":
        return _text(start_response, str(_state["reads"]).encode())
    if path == "/upload":  # read in 64 KiB blocks, as an app saving an upload does
        stream, h, n = environ["wsgi.input"], hashlib.sha256(), 0
        try:
            while True:
                block = stream.read(65536)
                if not block:
                    break
                h.update(block)
                n += len(block)
                _state["progress"] = n
            result = f"{n} {h.hexdigest()}"
        except OSError as exc:
            result = f"{n} then {type(exc).__name__}: {exc}"
        with _lock:
            _state["last"] = result
        return _text(start_response, result.encode())
    if path == "/progress":  # bytes the running /upload has read
        return _text(start_response, str(_state.get("progress", 0)).encode())
    if path == "/last":
        return _text(start_response, _state["last"].encode())
    if path == "/lines":  # ?how=readline|readlines|iter|sized
        stream, how = environ["wsgi.input"], q.get("how", "readline")
        if how == "readlines":
            lines = stream.readlines()
        elif how == "iter":
            lines = list(stream)
        elif how == "sized":  # readline(5): at most 5 bytes, the rest of the line next time
            lines = []
            while True:
                line = stream.readline(5)
                if not line:
                    break
                lines.append(line)
        else:
            lines = []
            while True:
                line = stream.readline()
                if not line:
                    break
                lines.append(line)
        return _text(start_response, json.dumps([line.decode("latin-1") for line in lines]).encode())
    if path.startswith("/env") or path == "":
        keys = ("SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "wsgi.input_terminated")
        return _text(start_response, json.dumps({k: environ.get(k) for k in keys}).encode())
    if path == "/boom":
        raise RuntimeError("boom in the conformance app")
    return _text(start_response, b"not found\n", "404 Not Found")
