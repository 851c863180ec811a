"""The argument parser: built from the option table in config.py, with one-line usage errors."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

import prefork

from .config import UsageError
from .options import GROUPS, OPTIONS

DESCRIPTION = "prefork: the Node.js cluster model for Python (a primary, N workers, shared ports)."
EPILOG = """examples:
  prefork serve myapp.main:app --workers 4 --bind 0.0.0.0:8000
  prefork run --workers 2 server.py --port 8080
  prefork ctl status --watch
signals to the primary: HUP rolling reload, TERM/INT graceful stop, TTIN/TTOU one worker more/fewer,
USR2 hot upgrade (a new primary takes the sockets over)."""


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit code 2), not argparse's usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


MAX_SECONDS = 365 * 24 * 3600.0  # larger waits overflow the kernel's and Python's timers (OverflowError)


def _seconds(text: str, zero_ok: bool = False) -> float:
    """A finite number of seconds, above 0 (argparse makes the ValueError a one-line usage error)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    low_ok = seconds >= 0 if zero_ok else seconds > 0
    if not (low_ok and seconds <= MAX_SECONDS):  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number of seconds, {'0' if zero_ok else 'above 0'} to "
                                         f"{MAX_SECONDS:.0f} (a year), not {text!r}")
    return seconds


def _interval(text: str) -> float:
    return _seconds(text, zero_ok=True)


def _name(text: str) -> str:
    from .values import to_name

    try:
        return to_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number (0 or more), not {text!r}")
    return n


def _checked(convert: Any) -> type[argparse.Action]:
    """An option with other spellings is checked as it is parsed, so the message names the spelling
    given ("--timeout-keep-alive: ...", as config.resolve words it); the text is kept for resolve."""
    class Checked(argparse.Action):
        def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
            try:
                convert(values)
            except ValueError as exc:
                raise UsageError(f"{option_string}: {exc}") from None
            setattr(namespace, self.dest, values)
    return Checked


def _add_options(parser: argparse.ArgumentParser, command: str) -> None:
    grouped = {name: title for title, names in GROUPS for name in names}
    groups: dict[str, Any] = {title: parser.add_argument_group(f"{title} options") for title, _ in GROUPS}
    ordered = {name: i for i, name in enumerate(grouped)}
    for option in sorted(OPTIONS, key=lambda o: ordered.get(o.name, len(ordered))):
        if command not in option.commands or option.name == "app":
            continue
        target = groups.get(grouped.get(option.name, ""), parser)
        flag = "--" + option.name.replace("_", "-")
        default = option.default
        shown = "" if default in (None, "", False) else f" (default: {default if not option.repeat else ''})"
        shown = shown.replace(" (default: )", "")
        # argparse formats help with %: a literal % (gunicorn's atoms in --access-log-format) is doubled
        text = (option.help + shown).replace("%", "%%")
        kw: dict[str, Any] = {"dest": option.name, "help": text, "default": argparse.SUPPRESS}
        flags = (flag, *option.aliases)
        if option.aliases and not option.flag and not option.repeat:
            kw["action"] = _checked(option.convert)
        if option.flag:
            target.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif option.repeat:
            target.add_argument(*flags, action="append", metavar=option.metavar, **kw)
        else:
            target.add_argument(*flags, metavar=option.metavar or "VALUE", **kw)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="read options from FILE (TOML; [tool.prefork] table or top level); "
                             "default: [tool.prefork] in ./pyproject.toml. Flags win, then "
                             "PREFORK_CMD_ARGS (more flags, split as a shell would), then PREFORK_* "
                             "variables")


def build() -> Parser:
    parser = Parser(prog="prefork", description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"prefork {prefork.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    serve = sub.add_parser("serve", help="serve an ASGI or WSGI app in N workers",
                           description="Serve MODULE:APP (ASGI or WSGI) in N workers sharing the listening "
                                       "sockets. Needs the serve extra: pip install 'prefork[serve]'.")
    serve.add_argument("app", nargs="?", metavar="MODULE:APP", help="e.g. myproject.main:app")
    _add_options(serve, "serve")

    run = sub.add_parser("run", help="run a Python script in N workers, this command being the primary",
                         description="Run SCRIPT in N workers; the command itself is the primary, so "
                                     "a script that listens with prefork.listen or prefork.HTTPServer gets "
                                     "supervision, reload and control (as PM2's -i).")
    _add_options(run, "run")
    run.add_argument("script", metavar="SCRIPT", help="the Python script each worker runs")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for the script")

    ctl = sub.add_parser("ctl", help="control a running primary: status, reload, scale N, upgrade, stop",
                         description="Talk to a running primary through its control socket.")
    where = ctl.add_mutually_exclusive_group()
    where.add_argument("--control", metavar="PATH", default=None,
                       help="control socket (default: the per-user default of serve/run)")
    where.add_argument("--name", metavar="NAME", type=_name, default=None,
                       help="the server started with --name NAME (its NAME.sock in the per-user folder)")
    ctl.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                     help="how long to wait for the primary's answer (default: 10, upgrade: 300)")
    actions = ctl.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    status = actions.add_parser("status", help="a table of the workers")
    status.add_argument("--json", action="store_true", help="print JSON for machines")
    status.add_argument("--watch", action="store_true", help="refresh the table live (Ctrl-C to quit)")
    status.add_argument("--interval", type=_interval, default=1.0, metavar="SECONDS", help="refresh period")
    status.add_argument("--count", type=_count, default=0, metavar="N", help="with --watch: stop after N "
                                                                          "refreshes (0: never)")
    actions.add_parser("reload", help="rolling reload with no dropped connection")
    scale = actions.add_parser("scale", help="change the number of workers")
    scale.add_argument("n", metavar="N", help="the new number of workers (or +K / -K)")
    upgrade = actions.add_parser("upgrade", help="hot upgrade: a new primary takes the sockets over",
                                 description="Start a new primary (this one's command line, or `-- ARGS`: "
                                             "the prefork command line after 'prefork'); once its workers "
                                             "are ready this one drains and exits. If it fails, this one "
                                             "serves on and says why.")
    upgrade.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                         help="e.g. -- serve myapp.main:app --workers 8")
    stop = actions.add_parser("stop", help="stop gracefully (after --shutdown-delay, as SIGTERM)")
    stop.add_argument("--now", action="store_true", help="stop at once: no shutdown delay, no drain")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build()
    if not argv:
        parser.print_help(sys.stderr)
        raise UsageError("a command is needed: serve, run or ctl")
    ns = parser.parse_args(argv)
    if ns.command is None:
        raise UsageError("a command is needed: serve, run or ctl (see 'prefork --help')")
    if ns.command == "ctl" and ns.action is None:
        raise UsageError("ctl needs an action: status, reload, scale N, upgrade or stop "
                         "(see 'prefork ctl --help')")
    return ns


def flags_of(ns: argparse.Namespace, command: str) -> dict[str, Any]:
    """The options the user gave on the command line (absent ones fall back to env, file, defaults)."""
    return {o.name: getattr(ns, o.name) for o in OPTIONS
            if command in o.commands and o.name != "app" and hasattr(ns, o.name)}
