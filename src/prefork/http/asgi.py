"""Finding the app behind MODULE:APP and telling ASGI from WSGI, with one-line errors for people.

Kept apart from the worker so that the primary can check an app (with --preload) the same way.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import time
from typing import Any

INTERFACES = ("auto", "asgi", "asgi3", "asgi2", "wsgi")


class AppError(Exception):
    """A problem with the app the user named, worded for a person (one line, no traceback)."""


def import_app(spec: str, *, factory: bool = False, app_dir: str | None = None) -> Any:
    """Import `module:attr` (attr may be dotted) and return the object; AppError says what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AppError(f"app {spec!r}: expected MODULE:APP, e.g. myproject.main:app")
    if app_dir is not None and app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise AppError(f"app {spec!r}: no module named {module_name!r}") from exc
        raise  # an import inside the app failed: that is the app's error, shown as it is
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppError(f"app {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if factory:
        if not callable(obj):
            raise AppError(f"app {spec!r}: --factory given but {attr!r} is a {type(obj).__name__}, "
                           "not a function")
        obj = obj()
    if not callable(obj):
        raise AppError(f"app {spec!r} is not an ASGI or WSGI application "
                       f"(it is {type(obj).__name__} {obj!r:.40})")
    return obj


def detect_interface(app: Any, spec: str = "app") -> str:
    """'asgi3', 'asgi2' or 'wsgi', from the app's call signature (as uvicorn does, plus WSGI)."""
    if inspect.isclass(app):
        if hasattr(app, "__await__"):
            return "asgi3"
        target: Any = app.__init__
        skip = 1
    elif inspect.isfunction(app) or inspect.ismethod(app):
        target, skip = app, 0
    else:
        target, skip = type(app).__call__, 1
    unsure = f"{spec}: cannot tell whether it is ASGI or WSGI; pass --interface asgi|wsgi"
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(type(app).__call__):
        return "asgi3"
    try:
        params = list(inspect.signature(target).parameters.values())[skip:]
    except (TypeError, ValueError):
        raise AppError(unsure) from None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        raise AppError(unsure)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) <= 3 <= len(positional):
        return "asgi3"
    if len(required) <= 2 <= len(positional):
        return "wsgi"
    if len(required) <= 1 <= len(positional):
        return "asgi2"
    raise AppError(f"{spec} is not an ASGI or WSGI application: it takes {len(positional)} argument(s) "
                   "(ASGI: scope, receive, send; WSGI: environ, start_response)")


def resolve_interface(app: Any, interface: str, spec: str = "app") -> str:
    """The interface in force: the user's choice ('asgi' means asgi3) or the detected one."""
    if interface == "asgi":
        return "asgi3"
    if interface == "auto":
        return detect_interface(app, spec)
    return interface


class AccessLog:
    """ASGI middleware writing one access line per HTTP request (only with --access-log): Common Log
    Format, or --access-log-format's atoms (accesslog.py); with --log-format json, one JSON object
    with the line as `msg` and the request's fields beside it."""

    def __init__(self, app: Any, write: Any, fmt: str | None = None, json_lines: bool = False) -> None:
        from .accesslog import Formatter

        self.app = app
        self.write = write
        self.formatter = Formatter(fmt)
        self.json_lines = json_lines

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0
        size = 0
        headers: Any = ()

        async def counting_send(message: Any) -> None:
            nonlocal status, size, headers
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                headers = message.get("headers") or ()
            await send(message)
            if kind == "http.response.body":  # counted once taken: a body past its length is not
                size += len(message.get("body", b""))

        start = time.perf_counter()
        try:
            return await self.app(scope, receive, counting_send)  # what it returns: the server checks it
        except BaseException:
            if not size:  # the server answers 500 if nothing was written yet (onewrite.py)
                status = 500
            raise
        finally:
            self._log(scope, status or 500, size, time.perf_counter() - start, headers)

    def _log(self, scope: Any, status: int, size: int, duration: float, headers: Any) -> None:
        from .accesslog import Entry

        entry = Entry(scope, status, size, duration, headers)
        try:
            line = self.formatter.line(entry)
            if self.json_lines:
                from prefork import logline

                text = logline.record("info", line, **self.formatter.fields(entry))
            else:
                text = line + "\n"
        except Exception as exc:  # an odd request must not fail its response for want of a log line
            text = f"prefork: access log: {type(exc).__name__}: {exc}\n"
        self.write(text)
