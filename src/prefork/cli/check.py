"""gunicorn's --check-config and --print-config for `prefork serve`: the resolved options with the
source of each value, and the app imported once in the primary; then exit 0, or 2 with one line."""

from __future__ import annotations

import json
import sys
from typing import Any

from .config import UsageError

SECRET = ("ssl_keyfile_password",)


def show(opts: dict[str, Any], command: str) -> str:
    """One line per option: `name = value  # source` (flag, PREFORK_* variable, config file, default)."""
    from .options import OPTIONS

    sources = opts.get("_sources", {})
    lines = []
    for option in OPTIONS:
        if command not in option.commands or option.name not in opts:
            continue
        value = opts[option.name]
        shown = "'***'" if option.name in SECRET and value else json.dumps(value)
        source = sources.get(option.name, "the MODULE:APP argument" if option.name == "app" else "default")
        lines.append(f"{option.name} = {shown}  # {source}")
    return "\n".join(lines)


def check_app(worker_opts: dict[str, Any]) -> str:
    """Import the app as a worker would; its interface, or a UsageError with the reason."""
    from prefork.http.asgi import AppError, import_app, resolve_interface

    if worker_opts["app_dir"] not in sys.path:
        sys.path.insert(0, worker_opts["app_dir"])
    spec = worker_opts["app"]
    try:
        app = import_app(spec, factory=worker_opts["factory"])
        return str(resolve_interface(app, worker_opts["interface"], spec))
    except AppError as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:
        raise UsageError(f"app {spec!r} failed to import: {type(exc).__name__}: {exc}") from None
