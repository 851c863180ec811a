"""`serve --preload`'s template entry (template_boot.py): import the app once, fork workers with it.

Runs in the template process, never in the primary: the app and the serving machinery (uvicorn,
uvloop, the protocol) are imported here, so every worker forked from this process shares their
pages, and a bug at import fails this code version only.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

from .worker import ENV_OPTIONS


class ImportFailed(Exception):
    """The app could not be imported: one line for the primary to print."""

    one_line = True


def prepare() -> tuple[Any, dict[str, Any]]:
    """Import the app; (what each forked worker runs, what the primary is told)."""
    from .. import proctitle
    from .asgi import AppError, import_app, resolve_interface

    # ours, not the app's (it may hold a key's password): each worker's fork request carries its own
    opts = json.loads(os.environ.pop(ENV_OPTIONS))
    proctitle.set_title(f"template {opts['app']}", "prefork-tmpl")
    if opts["app_dir"] not in sys.path:
        sys.path.insert(0, opts["app_dir"])
    try:
        app = import_app(opts["app"], factory=opts["factory"])
        interface = resolve_interface(app, opts["interface"], opts["app"])
    except AppError as exc:
        raise ImportFailed(str(exc)) from exc
    except Exception as exc:
        raise ImportFailed(f"app {opts['app']!r} failed to import: {type(exc).__name__}: {exc}") from exc
    opts["interface"] = opts["interface_resolved"] = interface
    _warm(opts, app, interface)
    return functools.partial(_worker, opts, app), {"interface": interface, "pid": os.getpid()}


def warm_machinery() -> None:
    """A spare template (versions.py), before it knows the app: what `_warm` imports, with a stand-in
    app, so that a reload's import is the app's alone."""
    from .. import proctitle

    opts = json.loads(os.environ[ENV_OPTIONS])
    proctitle.set_title(f"template (spare) {opts['app']}", "prefork-tmpl")
    _warm(opts, _stand_in, "asgi3")
    from . import wsgi  # noqa: F401 - for a WSGI app


async def _stand_in(scope: Any, receive: Any, send: Any) -> None:
    """The app a spare warms the machinery with; never called."""


def _warm(opts: dict[str, Any], app: Any, interface: str) -> None:
    """Import here what a worker imports before it serves (uvicorn's config, protocols, lifespan,
    middlewares; uvloop): about 140 modules that each forked worker would otherwise load from disk
    on its own, which made a respawn take ~80 ms instead of a few, and kept them out of the shared
    pages. Building the config starts no thread, so forking stays safe."""
    from .uvconfig import build_config

    try:
        build_config({**opts, "log_config": None}, app, interface)  # applied once, by each worker
        import uvloop  # noqa: F401
    except Exception:  # the worker will meet it again, and say so in its own way
        pass
    # prefork's own worker side (the channel, the worker's boot, the listeners and each policy's
    # hand-off): ~7 ms of imports (PYTHONPROFILEIMPORTTIME) each forked worker made before it was ready
    import faulthandler  # noqa: F401

    from .. import child, servers  # noqa: F401
    from ..cli import _boot  # noqa: F401
    from ..policies import least_conn, reuseport, round_robin, shared  # noqa: F401


def _worker(opts: dict[str, Any], app: Any) -> None:
    """What a worker forked from the template runs: the app is already imported."""
    from . import worker

    os.environ.pop(ENV_OPTIONS, None)  # ours, not the app's (as worker.main does)
    sys.exit(worker.run(opts, app))
