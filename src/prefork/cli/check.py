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


def check_log_config(path: str) -> None:
    """--log-config FILE parses (JSON object, YAML with PyYAML, or logging's INI sections), so a typo is
    one line here rather than a boot error in every worker."""
    import os

    where = f"--log-config {path}"
    if not os.path.isfile(path):
        raise UsageError(f"{where}: no such file")
    try:
        if path.endswith(".json"):
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or "version" not in data:
                raise UsageError(f"{where}: expected a logging.config.dictConfig object with a version")
        elif path.endswith((".yaml", ".yml")):
            try:
                import yaml  # type: ignore[import-untyped]
            except ImportError:
                raise UsageError(f"{where}: reading YAML needs PyYAML (pip install pyyaml)") from None
            with open(path) as f:
                if not isinstance(yaml.safe_load(f), dict):
                    raise UsageError(f"{where}: expected a logging.config.dictConfig mapping")
        else:
            import configparser

            parser = configparser.ConfigParser()
            parser.read(path)
            missing = [s for s in ("loggers", "handlers", "formatters") if not parser.has_section(s)]
            if missing:
                raise UsageError(f"{where}: an INI logging config needs the sections "
                                 f"{', '.join('[' + s + ']' for s in missing)}")
    except UsageError:
        raise
    except Exception as exc:  # JSON, YAML or INI syntax, or an unreadable file
        raise UsageError(f"{where}: {type(exc).__name__}: {exc}") from None
