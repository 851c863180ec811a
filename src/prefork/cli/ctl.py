"""`prefork ctl`: status (table, --json, --watch), reload, scale N, upgrade, stop, through the control
socket."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from prefork.control import ControlError, request
from prefork.upgrade import MAX_ARGS

from .config import MAX_WORKERS, UsageError
from .output import status_table

UPGRADE_WAIT = 300.0  # the primary answers within its --ready-timeout (+ 15 s)


def ctl(ns: Any) -> int:
    path, timeout = ns.control, ns.timeout or (UPGRADE_WAIT if ns.action == "upgrade" else 10.0)
    if getattr(ns, "name", None):  # the socket of the server started with --name NAME
        from prefork.control import default_path

        path = default_path(ns.name)
    action = ns.action
    if action == "status":
        return _status(path, timeout, ns)
    if action == "scale":
        n = ns.n.strip()
        digits = n[1:] if n[:1] in "+-" else n
        ok = digits.isascii() and digits.isdigit() and int(digits) <= MAX_WORKERS
        if not ok or (digits == n and int(n) < 1):
            raise UsageError(f"scale: expected a number of workers (1 to {MAX_WORKERS}) or +K/-K, "
                             f"not {ns.n!r}")
        message: dict[str, Any] = {"cmd": "scale", "n": int(n) if n.isdigit() else n}
    elif action == "upgrade":
        args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
        if args and (len(args) > MAX_ARGS or args[0] not in ("serve", "run")):
            raise UsageError(f"upgrade: expected `-- serve ...` or `-- run ...` (at most {MAX_ARGS} "
                             f"arguments), not {' '.join(args)[:100]!r}")
        message = {"cmd": "upgrade", "args": args or None}
    else:
        message = {"cmd": action}
        if action == "stop" and ns.now:
            message["now"] = True
    reply = request(path, message, timeout)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "the primary refused"))
    print(reply.get("message", "ok"))
    return 0


def _status(path: str | None, timeout: float, ns: Any) -> int:
    def fetch() -> dict[str, Any]:
        reply = request(path, {"cmd": "status"}, timeout)
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "the primary refused"))
        return reply["status"]

    if not ns.watch:
        status = fetch()
        print(json.dumps(status, indent=2) if ns.json else status_table(status))
        return 0
    shown = 0
    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                status = fetch()
            except ControlError as exc:
                if shown:
                    print(f"\nprimary gone: {exc}")
                    return 0
                raise
            text = json.dumps(status) if ns.json else status_table(status)
            if tty and not ns.json:
                sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")  # home + clear, as `watch` does
            else:
                sys.stdout.write(text + "\n\n")
            sys.stdout.flush()
            shown += 1
            if ns.count and shown >= ns.count:
                return 0
            time.sleep(max(0.1, ns.interval))
    except KeyboardInterrupt:
        return 0
