"""One `prefork serve` worker: an asyncio loop (uvloop when installed) running uvicorn's protocols.

The primary hands connections over (or lets us accept on a shared / SO_REUSEPORT socket); the
serving loop (server.py) takes them from each `prefork.listen()` Listener as soon as its fd is
readable and gives each socket to uvicorn's HTTP protocol, so parsing, keep-alive, WebSocket
upgrades, lifespan and graceful shutdown are uvicorn's well-tested code; uvconfig.py builds what
uvicorn is given. This module is the entry: logging, titles, signals, the app, the boot error.

Started by the primary as `python -m prefork.http.worker` with the options as JSON in the
environment variable PREFORK_SERVE (see prefork/cli/serve.py).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import sys
import traceback
from typing import Any

from .. import hooks, logfile, logline, proctitle
from .server import Server
from .uvconfig import BootError, build_config, configure_logging, load_app

ENV_OPTIONS = "PREFORK_SERVE"
GC_THRESHOLD = 50000  # --gc-threshold's default, see _young_threshold
BOOT_ERROR = 3  # exit code of a worker whose app could not start (as gunicorn's)


async def _serve(opts: dict[str, Any], child: Any, app: Any, interface: str, out: Any = None) -> None:
    config = build_config(opts, app, interface, out)
    server = Server(opts, config, child)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, server.begin_shutdown)
    try:
        await server.start()
        # Boot's objects (modules, the app, the template's) are long-lived: out of the collector's
        # sight, a full collection scans only what serving made. With 2,000 keep-alive clients each
        # worker ran 10 full collections in 5 s, 36-43 ms each; 13-17 ms after this.
        gc.freeze()
        _young_threshold(int(opts.get("gc_threshold", GC_THRESHOLD)))
    except BaseException:
        server.stopping = True
        server.stopped.set()
        for listener in server.listeners:
            listener.close()
        raise
    await server.stopped.wait()
    # before finished(): that lets the drain thread close the channel, after which the worker is
    # ended within 2 s (child.py), which a slow shutdown of the loop could reach before the hook
    hooks.in_worker("worker_exit")
    server.finished()


def _young_threshold(n: int) -> None:
    """Python collects its youngest generation every 700 net allocations of container objects (2000
    from 3.13). A loop serving many connections at once keeps more than that alive within one turn
    (each request's scope, headers, cycle, task), so with 2,000 keep-alive clients a worker
    collected some 400 times a second, and each tenth young collection was a middle one of ~1.8 ms:
    14 % of its time, measured with gc.callbacks. A higher threshold leaves short-lived objects to
    reference counting, as they are, and still collects cycles; the older generations keep Python's
    ratios."""
    if n <= 0:
        gc.disable()
        return
    _, middle, old = gc.get_threshold()
    gc.set_threshold(n, middle, old)


def _report_boot_error(child: Any, message: str, trace: str = "") -> None:
    """Tell the primary, which prints the line (and the traceback) once for all workers and all
    retries of a crash loop; or print them ourselves."""
    if child is not None:
        try:
            child.channel.send_internal({"t": "boot_error", "message": message, "traceback": trace[-65536:]})
            return
        except Exception:
            pass
    print(f"{trace}prefork: error: {message}", file=sys.stderr, flush=True)


def run(opts: dict[str, Any], app: Any = None) -> int:
    """Serve until drained; the exit code. `app` is given when the primary preloaded it."""
    from prefork import _role

    child = _role.child
    wid = child.worker.id if child is not None else 0
    debug = opts.get("log_level") in ("debug", "trace")
    fmt = logline.take_worker_format()  # the primary's choice, kept out of the app's environment
    fmt = opts.get("log_format") or fmt
    configure_logging(wid, opts.get("log_level", "info"), fmt)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the primary, which drains us
    access_out = logline.raw(sys.stdout)  # access lines are written whole, never prefixed
    if child is not None:  # what the app prints carries the worker's id, as the log lines do
        from prefork.cli._boot import wrap_output

        wrap_output(wid, fmt)  # `[worker N] line`, or one JSON object per line
        proctitle.set_title(f"worker {wid} {opts['app']}", f"prefork-w{wid}")
        if app is not None:  # forked by a template, whose fds 1/2 may predate a log rotation
            logfile.reopen(opts.get("log_file"))
        logfile.follow_reopen(opts.get("log_file"))
    # the primary reopens --log-file on SIGUSR1 and tells us through the channel; the signal sent to
    # this worker itself does the same (as gunicorn's workers), rather than end it (its default)
    signal.signal(signal.SIGUSR1, lambda *_: logfile.reopen(opts.get("log_file")))
    hooks.in_worker("post_fork")  # --hooks (prefork/hooks.py): before the app is loaded, unless preloaded
    try:
        if app is None:
            app, interface = load_app(opts)
        else:
            interface = opts["interface_resolved"]
        hooks.in_worker("post_worker_init")
        loop_factory = _loop_factory()
        runner = asyncio.Runner(loop_factory=loop_factory) if hasattr(asyncio, "Runner") else None
        if runner is not None:
            with runner:
                runner.run(_serve(opts, child, app, interface, access_out))
        else:  # Python 3.10
            if loop_factory is not None:
                asyncio.set_event_loop_policy(__import__("uvloop").EventLoopPolicy())
            asyncio.run(_serve(opts, child, app, interface, access_out))
    except Exception as exc:
        from .asgi import AppError

        shown = debug or not isinstance(exc, (AppError, BootError, ImportError, SyntaxError))
        trace = traceback.format_exc() if shown else ""
        text = str(exc) if isinstance(exc, (AppError, BootError)) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (ImportError, SyntaxError)) and not isinstance(exc, AppError):
            text = f"app {opts['app']!r} failed to import: {text}"
        _report_boot_error(child, text, trace)
        return BOOT_ERROR
    finally:  # on every way out but a kill, as gunicorn's (once per process: _serve's call counts)
        hooks.in_worker("worker_exit")
    return 0


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    opts = json.loads(os.environ.pop(ENV_OPTIONS))
    code = run(opts)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code) if code else sys.exit(0)


if __name__ == "__main__":
    main()
