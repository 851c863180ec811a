"""PREFORK_CMD_ARGS (gunicorn's GUNICORN_CMD_ARGS): more command-line options from the environment,
e.g. PREFORK_CMD_ARGS="--workers 4 --timeout-keep-alive 10", for a platform that lets you set
variables but not the command.

Split as a shell would (shlex), parsed by the same option table as the flags of `prefork serve` /
`prefork run` (options only: no app, no script), and checked by the same converters. They count as
the start of the command line: above the config file and the PREFORK_* variables, below the flags
actually given (gunicorn: GUNICORN_CMD_ARGS above the config file, the command line above it). A
`--config FILE` there is used when the command line has none. Every problem is one line starting
with PREFORK_CMD_ARGS, exit 2; --print-config shows `PREFORK_CMD_ARGS --flag` as the source.
`prefork ctl` does not read it (gunicorn has no ctl; a ctl flag there would reach serve too).
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any, NoReturn

from .config import UsageError

ENV = "PREFORK_CMD_ARGS"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (options of '{self.prog}' only)")


def read(command: str, environ: Any) -> tuple[dict[str, Any], str | None]:
    """The options PREFORK_CMD_ARGS gives `command` (as args.flags_of returns them), and its
    --config FILE if any."""
    from . import args

    text = environ.get(ENV, "")
    if not text.strip():
        return {}, None
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"{ENV}: {exc} (quoted as in a shell: {ENV}='--workers 4 --bind :80')") from None
    parser = _Parser(prog=f"prefork {command}", add_help=False)
    args._add_options(parser, command)
    try:
        ns = parser.parse_args(argv)
    except UsageError as exc:
        said = str(exc)  # a value an argparse action checked ("--keep-alive: ..."), or the parser's
        raise UsageError(f"{ENV}{' ' if said.startswith('--') else ': '}{said}") from None
    return args.flags_of(ns, command), ns.config


def apply(out: dict[str, Any], sources: dict[str, str], given: dict[str, Any]) -> None:
    """Convert and set the options read(): each value checked as a flag's is, the error naming
    PREFORK_CMD_ARGS and the flag."""
    from .config import _convert
    from .options import BY_NAME

    for name, value in given.items():
        option = BY_NAME[name]
        where = f"{ENV} --{name.replace('_', '-')}"
        if option.repeat:
            out[name] = [_convert(option, [v], where)[0] for v in value]
        else:
            out[name] = value if isinstance(value, bool) else _convert(option, value, where)
        sources[name] = where
