"""The `prefork` command: serve, run, ctl. `main(argv) -> exit code`.

Errors a person can fix end with one line on stderr and a non-zero code (2 for usage, 1 otherwise);
a traceback only with --log-level debug.
"""

from __future__ import annotations

import sys

from prefork import reaper

from . import output
from .config import UsageError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    reaper.guard_pid1()  # as PID 1 a SIGTERM without a handler is dropped: handle it from the start
    debug = _debug_requested(argv)
    try:
        return _main(argv)
    except UsageError as exc:
        output.error(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from prefork.control import ControlError

        from .serve import CommandError

        if debug:
            import traceback

            traceback.print_exc()
        if isinstance(exc, (ControlError, CommandError)):
            output.error(str(exc))
        else:
            output.error(f"{type(exc).__name__}: {exc}")
        return 1


def _debug_requested(argv: list[str]) -> bool:
    import os

    if os.environ.get("PREFORK_LOG_LEVEL", "").lower() in ("debug", "trace"):
        return True
    for i, arg in enumerate(argv):
        if arg in ("--log-level=debug", "--log-level=trace"):
            return True
        if arg == "--log-level" and i + 1 < len(argv) and argv[i + 1] in ("debug", "trace"):
            return True
    return False


def _main(argv: list[str]) -> int:
    from . import args as cli_args
    from .config import resolve

    ns = cli_args.parse(argv)
    if ns.command == "ctl":
        from .ctl import ctl

        return ctl(ns)
    opts = resolve(ns.command, cli_args.flags_of(ns, ns.command), ns.config)
    from prefork import proctitle

    proctitle.use_name(opts.get("name"))  # --name: titles and log tag here and in every process started
    if opts.get("chdir"):
        _chdir(opts)
    if ns.command == "serve":
        from .serve import serve

        if ns.app:
            opts["app"] = ns.app
        return serve(opts)
    from .run import run

    return run(opts, ns.script, ns.args)


def _chdir(opts: dict) -> None:
    """--chdir: go there now, and keep the path as given (not resolved): every later start (a worker,
    a template) resolves it again, so `current -> releases/N` swapped by a deploy is followed."""
    import os

    path = os.path.abspath(opts["chdir"])
    try:
        os.chdir(path)
    except OSError as exc:
        raise UsageError(f"--chdir {opts['chdir']}: {exc.strerror.lower()}") from None
    opts["chdir"] = path


if __name__ == "__main__":
    sys.exit(main())
