"""`prefork serve MODULE:APP`: check what can be checked in the primary, then start the pool.

Each worker runs `python -m prefork.http.worker` with the options as JSON in PREFORK_SERVE.
Problems a person can fix (a bad address, a port in use or privileged, a missing TLS file, an app
that cannot be found) are found here or reported by the first worker, and end the command with
one line and a non-zero exit.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from typing import Any

import prefork
from prefork import activation, proctitle

from . import output
from .config import UsageError, show_bind
from .supervised import run_supervised
from .tls import TLSError, check_tls


class CommandError(Exception):
    """A runtime problem (not a usage one): one line, exit code 1."""


def check_binds(binds: list[list[Any]]) -> None:
    """Try each TCP address once in the primary, so 'in use' and 'privileged' read clearly."""
    for bind in binds:
        shown = show_bind(bind)
        if bind[0] == "unix":
            folder = os.path.dirname(bind[1])
            if not os.path.isdir(folder):
                raise CommandError(f"cannot bind {shown}: no such folder {folder}")
            continue
        host, port = bind[1], bind[2]
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CommandError(f"cannot bind {host}:{port}: address already in use "
                                   "(another server is listening there)") from None
            if exc.errno == errno.EACCES:
                raise CommandError(f"cannot bind {host}:{port}: permission denied (ports below 1024 are "
                                   "privileged: use a port >= 1024, or grant CAP_NET_BIND_SERVICE)") \
                    from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise CommandError(f"cannot bind {host}:{port}: {host} is not an address of this "
                                   "machine") from None
            raise CommandError(f"cannot bind {host}:{port}: {exc.strerror}") from None
        finally:
            probe.close()


def serve(opts: dict[str, Any]) -> int:
    output.configure(opts)  # --log-format: every later line is JSON when asked
    if opts.get("env_file"):
        from . import envfile

        envfile.load(opts["env_file"])  # before workers start (they inherit it) and before --preload
    app = opts.get("app")
    if not app:
        raise UsageError("serve needs the app to serve, MODULE:APP (e.g. myproject.main:app), "
                         "as an argument or `app` in [tool.prefork]")
    if ":" not in app:
        raise UsageError(f"app {app!r}: expected MODULE:APP, e.g. myproject.main:app")
    import importlib.util

    if importlib.util.find_spec("uvicorn") is None:  # found, not imported: only workers need it
        raise CommandError("prefork serve needs its extra: pip install 'prefork[serve]'")
    try:
        check_tls(opts)
    except TLSError as exc:
        raise CommandError(str(exc)) from None
    if opts["ws"] in ("websockets", "wsproto") and importlib.util.find_spec(opts["ws"]) is None:
        raise CommandError(f"--ws {opts['ws']}: the {opts['ws']} package is not installed (pip install "
                           f"{opts['ws']})")
    if not opts.get("policy") and "PREFORK_SCHED_POLICY" not in os.environ:
        opts["policy"] = "reuseport"  # measured fastest here, and even: the kernel balances per socket
    labels = _inherited(opts)
    check_binds([b for b, label in zip(opts["bind"], labels, strict=True) if label is None])
    cwd = opts.get("chdir") or os.getcwd()  # --chdir as given: each start resolves it again
    if opts.get("log_config"):
        from .check import check_log_config

        check_log_config(opts["log_config"])
    app_dir = os.path.abspath(opts["app_dir"]) if opts.get("app_dir") else cwd
    if not os.path.isdir(app_dir):
        raise UsageError(f"--app-dir {opts['app_dir']}: no such folder")
    worker_opts = {
        "app": app, "binds": opts["bind"], "interface": opts["interface"], "factory": opts["factory"],
        "log_level": opts["log_level"], "access_log": opts["access_log"],
        "proxy_headers": opts["proxy_headers"], "forwarded_allow_ips": opts["forwarded_allow_ips"],
        "root_path": opts["root_path"], "certfile": _abs(opts["certfile"]), "keyfile": _abs(opts["keyfile"]),
        "ssl_keyfile_password": opts["ssl_keyfile_password"], "ssl_ca_certs": _abs(opts["ssl_ca_certs"]),
        "ssl_cert_reqs": opts["ssl_cert_reqs"], "ssl_ciphers": opts["ssl_ciphers"],
        "ssl_version": opts["ssl_version"],
        "threads": opts["threads"], "header_map": opts["header_map"], "keep_alive": opts["keep_alive"],
        "backlog": opts["backlog"], "gc_threshold": opts["gc_threshold"],
        "graceful_timeout": opts["graceful_timeout"] or None, "app_dir": app_dir,
        "timeout_header": opts["timeout_header"], "limit_request_line": opts["limit_request_line"],
        "limit_request_fields": opts["limit_request_fields"],
        "limit_request_field_size": opts["limit_request_field_size"],
        "limit_concurrency": opts["limit_concurrency"],
        "headers": opts["header"], "server_header": opts["server_header"],
        "date_header": opts["date_header"],
        "log_config": _abs(opts["log_config"]), "reset_contextvars": opts["reset_contextvars"],
        "lifespan": opts["lifespan"], "ws": opts["ws"], "ws_max_size": opts["ws_max_size"],
        "ws_max_queue": opts["ws_max_queue"], "ws_ping_interval": opts["ws_ping_interval"],
        "ws_ping_timeout": opts["ws_ping_timeout"], "ws_per_message_deflate": opts["ws_per_message_deflate"],
        "policy": opts.get("policy") or prefork.scheduling_policy,
        **output.worker_log_options(opts),  # checks --access-log-format: exit 2 before any worker
    }
    interface = opts["interface"]
    if opts.get("print_config") or opts.get("check_config"):
        from . import check

        if opts.get("print_config"):
            print(check.show(opts, "serve"), flush=True)
        interface = check.check_app(worker_opts)
        print(f"prefork: configuration OK: {app} ({interface})", flush=True)
        return 0
    from .devreload import prepare

    reloader = prepare(opts, output.log)  # --reload: checked (exit 2), and no .pyc, before any template
    os.environ["PREFORK_SERVE"] = json.dumps(worker_opts)
    prefork.setup_primary(module="prefork.http.worker", args=[], cwd=cwd)
    code = _templates(opts, cwd, app) if opts["preload"] else None
    tls = bool(opts["certfile"])
    addresses = [show_bind(b, tls) for b in opts["bind"]]
    shown = [label or address for label, address in zip(labels, addresses, strict=True)]
    rows = [("app", f"{app} ({interface})"), ("listening", ", ".join(shown))]
    if code is not None:
        rows.append(("preload", "a template process imports the app; workers fork from it"))
    proctitle.set_title(f"primary {app}", "prefork-primary")
    return run_supervised(opts, title=f"prefork {prefork.__version__} serve", rows=rows,
                          addresses=addresses if all(b[0] == "unix" or b[2] for b in opts["bind"]) else None,
                          listens=len(opts["bind"]), code=code,  # ready once it listens on every address
                          reloader=reloader)


def _inherited(opts: dict[str, Any]) -> list[str | None]:
    """Serve the sockets systemd passed (LISTEN_FDS), or fd://N binds, instead of binding; their
    labels for the banner (None: a plain address). reuseport needs a socket per worker, each bound
    by us, which an inherited socket cannot be: such a server falls back to rr."""
    try:
        taken = activation.take(opts["bind"])
    except activation.ActivationError as exc:
        raise UsageError(str(exc)) from None
    opts["bind"] = [bind for bind, _ in taken]
    labels = [label for _, label in taken]
    if any(labels) and (opts.get("policy") or prefork.scheduling_policy) == "reuseport":
        output.log("policy reuseport cannot serve an inherited socket (each worker would bind its own "
                   "SO_REUSEPORT socket): using rr")
        opts["policy"] = "rr"
    from prefork import upgrade

    return upgrade.label_binds(opts, labels, output.log)  # a hot upgrade's sockets (upgrade.py)


def _abs(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def _templates(opts: dict[str, Any], cwd: str, app: str) -> Any:
    """serve's preload: a template process per code version imports the app, never the primary
    (versions.py); run_supervised starts the first one once control and admin answer."""
    from prefork import _role
    from prefork.versions import CodeVersions

    primary = _role.require_primary("serve --preload")
    code = CodeVersions(primary, "prefork.http.preload:prepare", cwd, output.log,
                        import_timeout=opts["ready_timeout"] or 30.0, label=app,
                        spare=opts["spare_template"])
    primary.versions = code  # workers are forked by the current template
    return code
