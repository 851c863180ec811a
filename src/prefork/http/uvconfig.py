"""What a `prefork serve` worker gives uvicorn: the app (imported, its interface found), logging, and
uvicorn's Config with prefork's additions (the access log, WSGI through a thread pool, onewrite.py)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from .. import logline

FAST = [False]  # onewrite's response path is installed (httptools is there)


class BootError(Exception):
    """The app could not start in this worker; the message is for a person."""


def configure_logging(wid: int, level: str, fmt: str = "text") -> None:
    """Each worker's log lines carry its id, so interleaved output stays readable."""
    handler = logging.StreamHandler(logline.raw(sys.stderr))
    handler.setFormatter(logline.json_formatter(wid) if fmt == "json" else
                         logging.Formatter(f"[worker {wid}] %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if level != "trace" else 5)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(root.level)
    access = logging.getLogger("uvicorn.access")  # our own CLF middleware logs access instead
    access.handlers[:] = []
    access.propagate = False


_log_config_applied = [False]


def apply_log_config(opts: dict[str, Any]) -> None:
    """--log-config FILE, once per worker, over configure_logging's set-up: a dictConfig in JSON or
    YAML (PyYAML), else logging's INI format (fileConfig), as uvicorn reads it."""
    path = opts.get("log_config")
    if not path or _log_config_applied[0]:
        return
    _log_config_applied[0] = True
    import logging.config

    try:
        if path.endswith(".json"):
            import json

            with open(path) as f:
                logging.config.dictConfig(json.load(f))
        elif path.endswith((".yaml", ".yml")):
            import yaml  # type: ignore[import-untyped]

            with open(path) as f:
                logging.config.dictConfig(yaml.safe_load(f))
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except Exception as exc:
        raise BootError(f"--log-config {path}: {type(exc).__name__}: {exc}") from None


def load_app(opts: dict[str, Any]) -> tuple[Any, str]:
    from .asgi import import_app, resolve_interface

    apply_log_config(opts)  # before the import: the app's import-time lines follow it too

    spec = opts["app"]
    app = import_app(spec, factory=opts.get("factory", False), app_dir=opts.get("app_dir"))
    return app, resolve_interface(app, opts.get("interface", "auto"), spec)


def _headers(opts: dict[str, Any]) -> list[tuple[str, str]]:
    """--header pairs; `server: prefork` first with --server-header, unless a --header names the server."""
    headers = [(name, value) for name, value in opts.get("headers") or ()]
    if opts.get("server_header") and not any(name.lower() == "server" for name, _ in headers):
        headers.insert(0, ("server", "prefork"))
    return headers


def build_config(opts: dict[str, Any], app: Any, interface: str, out: Any = None) -> Any:
    import uvicorn

    apply_log_config(opts)  # a preloaded app skipped load_app

    ws = opts.get("ws", "auto")
    if interface == "wsgi":
        from .wsgi import wrap_wsgi

        app = wrap_wsgi(app, opts.get("threads") or 8, opts.get("header_map") or "drop",
                        opts.get("timeout_header", 10.0))  # also bounds each wait for body bytes
        interface, ws = "asgi3", "none"
    if opts.get("access_log") or opts.get("access_log_format"):
        from .asgi import AccessLog

        if interface == "asgi2":
            from uvicorn.middleware.asgi2 import ASGI2Middleware

            app, interface = ASGI2Middleware(app), "asgi3"
        out = out or sys.stdout

        def write(line: str) -> None:
            from prefork import _stdio

            _stdio.write(line, out)  # a closed log pipe is silenced, never an error in a request

        app = AccessLog(app, write, opts.get("access_log_format"), logline.is_json())
    try:
        import httptools  # noqa: F401

        from . import onewrite

        FAST[0] = onewrite.install()  # one write per response, headers checked once (onewrite.py)
        http = "httptools"
    except ImportError:
        http = "h11"
    extra: dict[str, Any] = {}
    if opts.get("reset_contextvars"):  # uvicorn 0.54's; prefork runs on uvicorn from 0.30
        import inspect

        if "reset_contextvars" not in inspect.signature(uvicorn.Config).parameters:
            raise BootError(f"--reset-contextvars needs uvicorn 0.54 or later, not {uvicorn.__version__}")
        extra["reset_contextvars"] = True
    config = uvicorn.Config(
        app,
        interface=interface,  # type: ignore[arg-type]
        http=http,
        ws=ws,
        lifespan=opts.get("lifespan", "auto"),  # type: ignore[arg-type]
        log_config=None,
        access_log=False,
        proxy_headers=bool(opts.get("proxy_headers", False)),
        forwarded_allow_ips=opts.get("forwarded_allow_ips") or "127.0.0.1",
        root_path=opts.get("root_path") or "",
        ssl_certfile=opts.get("certfile"),
        ssl_keyfile=opts.get("keyfile"),
        ssl_keyfile_password=opts.get("ssl_keyfile_password"),
        ssl_ca_certs=opts.get("ssl_ca_certs"),
        ssl_cert_reqs=opts.get("ssl_cert_reqs") or 0,
        ssl_ciphers=opts.get("ssl_ciphers") or "TLSv1",
        ssl_version=opts.get("ssl_version") or 17,  # ssl.PROTOCOL_TLS_SERVER, uvicorn's default
        timeout_keep_alive=int(opts.get("keep_alive", 5)),
        ws_max_size=opts.get("ws_max_size", 16 << 20),
        ws_max_queue=opts.get("ws_max_queue", 32),
        ws_ping_interval=opts.get("ws_ping_interval", 20.0) or None,  # 0: no pings
        ws_ping_timeout=opts.get("ws_ping_timeout", 20.0) or None,
        ws_per_message_deflate=opts.get("ws_per_message_deflate", True),
        limit_concurrency=opts.get("limit_concurrency"),  # per worker: 503 past it (uvicorn's protocol)
        timeout_graceful_shutdown=None,
        loop="none",
        server_header=False,  # ours says prefork, when asked (below)
        headers=_headers(opts),
        **extra,
        workers=1,  # else uvicorn parses WEB_CONCURRENCY (a bad value crashed it); cli/config.py reads it
    )
    config.load()
    return config
