"""PEP 3333's environ for one request of the WSGI bridge (wsgi.py), from uvicorn's ASGI scope.

SCRIPT_NAME and PATH_INFO with --root-path: a request path under the root path has it moved to
SCRIPT_NAME (gunicorn's rule, PEP 3333's meaning: /api/users with --root-path /api gives /api and
/users); a path outside it is taken as one a proxy already stripped (SCRIPT_NAME the root path,
PATH_INFO the path), which is what uvicorn's root_path means for ASGI (its scope's path is the root
path followed by the request's). So the app builds the same URLs behind a proxy that strips the
prefix and behind one that keeps it; only a stripped path that itself starts with the root path
(/api/api/x sent as /api/x) cannot be told apart, and is read as unstripped.
"""

from __future__ import annotations

import sys
from typing import Any
from urllib.parse import unquote_to_bytes

from .filewrapper import FileWrapper

_STATIC: dict[str, Any] = {  # the same in every request's environ: copied, not built, each time
    "wsgi.version": (1, 0),
    "wsgi.multithread": True,
    "wsgi.multiprocess": True,
    "wsgi.run_once": False,
    "wsgi.file_wrapper": FileWrapper,
}
_KEYS: dict[bytes, str] = {}  # header name -> environ key; a client could send endless new names: bounded
_KEYS_MAX = 512


def environ(scope: Any, body: Any, header_map: str = "drop") -> dict[str, Any]:
    """PEP 3333's environ from an ASGI HTTP scope (strings are bytes-as-latin-1, as WSGI wants).
    A header named with an underscore maps to the same key as one with a dash (X_User and X-User:
    HTTP_X_USER), so a client could pass for a proxy: it is dropped unless `header_map` is
    "dangerous" (gunicorn 22's rule and setting)."""
    script_name, path_info = _paths(scope)
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    env = _STATIC.copy()
    env["REQUEST_METHOD"] = scope["method"]
    env["SCRIPT_NAME"] = script_name
    env["PATH_INFO"] = path_info
    env["QUERY_STRING"] = scope.get("query_string", b"").decode("latin-1")
    env["SERVER_PROTOCOL"] = f"HTTP/{scope.get('http_version', '1.1')}"
    env["SERVER_NAME"] = str(server[0])
    env["SERVER_PORT"] = str(server[1] if server[1] is not None else 80)
    env["REMOTE_ADDR"] = client[0]
    env["REMOTE_PORT"] = str(client[1])
    env["wsgi.url_scheme"] = scope.get("scheme", "http")
    env["wsgi.input"] = body
    env["wsgi.errors"] = sys.stderr
    keep_underscores = header_map == "dangerous"
    keys = _KEYS
    for name, value in scope.get("headers", ()):
        key = keys.get(name)  # never a name with an underscore: the map setting decides each time
        if key is None:
            if b"_" in name and not keep_underscores:
                continue
            key = _key(name)
        text = value.decode("latin-1")
        if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
            env[key] = text
            continue
        env[key] = env[key] + "," + text if key in env else text
    if "CONTENT_LENGTH" not in env:  # a chunked body (or none): the stream ends where it ends, so an
        env["wsgi.input_terminated"] = True  # app may read to its end (werkzeug reads chunked uploads)
    return env


def _key(name: bytes) -> str:
    """The environ key of a header name (HTTP_X_FORWARDED_FOR; CONTENT_TYPE and CONTENT_LENGTH bare),
    remembered while the cache has room, unless the name has an underscore."""
    key = name.decode("latin-1").upper().replace("-", "_")
    if key != "CONTENT_TYPE" and key != "CONTENT_LENGTH":
        key = "HTTP_" + key
    if len(_KEYS) < _KEYS_MAX and b"_" not in name:
        _KEYS[name] = key
    return key


def _paths(scope: Any) -> tuple[str, str]:
    """(SCRIPT_NAME, PATH_INFO) as PEP 3333 wants them: PATH_INFO is the request's path, %-decoded,
    its bytes as latin-1 (from raw_path: a %FF survives); see the module's docstring for --root-path."""
    root = scope.get("root_path", "") or ""
    raw = scope.get("raw_path")
    if raw is None:
        raw = scope["path"].encode("utf-8")
    if not root:  # the usual case, kept short (every request)
        return "", (raw.decode("latin-1") if b"%" not in raw else unquote_to_bytes(raw).decode("latin-1"))
    prefix = root.encode("utf-8")
    if prefix and raw.startswith(prefix):  # uvicorn puts the root path before the request's own
        raw = raw[len(prefix):]
    script = prefix.rstrip(b"/")
    if script and (raw == script or raw.startswith(script + b"/")):
        raw = raw[len(script):]  # the client asked under the root path: that part is SCRIPT_NAME
    return script.decode("latin-1"), unquote_to_bytes(raw).decode("latin-1")
