"""The option table of `prefork serve` and `prefork run`: each option's name, converter (config.py),
default, help and flag spellings. args.py builds the parser from it, config.py resolves it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import (
    INTERFACES,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_BACKLOG,
    MAX_WORKERS,
    POLICIES,
    READY,
    choice,
    in_range,
    seconds_upto,
    to_address,
    to_backlog,
    to_binds,
    to_bool,
    to_count,
    to_headers,
    to_host,
    to_path,
    to_positive,
    to_seconds,
    to_size,
    to_str,
    to_workers,
)
from .tls import to_cert_reqs, to_ssl_version
from .values import to_module, to_name, to_paths, to_umask

LIFESPANS = ("auto", "on", "off")
HEADER_MAPS = ("drop", "refuse", "dangerous")
WS = ("auto", "none", "websockets", "wsproto")
MAX_LINE = 1 << 20  # gunicorn stops at 8190; longer lines are rare but legitimate (long query strings)
MAX_FIELDS = 32768  # gunicorn's maximum, also what its 0 means
MAX_FIELD = 1 << 20
MAX_CONCURRENCY = 1 << 20  # far above the descriptors a worker may hold


@dataclass(frozen=True)
class Option:
    name: str  # python name; flag is --name-with-dashes, variable PREFORK_NAME
    convert: Callable[[Any], Any]
    default: Any
    help: str
    commands: tuple[str, ...] = ("serve", "run")
    metavar: str | None = None
    flag: bool = False  # a switch (--x / --no-x)
    repeat: bool = False  # --bind may be given several times
    aliases: tuple[str, ...] = ()  # other spellings of the flag (uvicorn's, gunicorn's, granian's)


OPTIONS: tuple[Option, ...] = (
    Option("workers", to_workers, "auto", f"number of worker processes (1 to {MAX_WORKERS}), or 'auto' for "
           "one per core; WEB_CONCURRENCY is used when neither this, PREFORK_WORKERS nor the config file "
           "sets it",
           metavar="N|auto"),
    Option("bind", to_binds, ["127.0.0.1:8000"], "address to serve, HOST:PORT, unix:PATH or fd://N (a "
           "listening socket passed to prefork as descriptor N); repeat for more (default "
           "127.0.0.1:8000). Sockets passed by systemd's socket activation (LISTEN_FDS) replace these",
           ("serve",), "ADDRESS", repeat=True),
    Option("host", to_host, None, "uvicorn's: serve HOST:PORT (with --port; port 8000 when only --host is "
           "given), in addition to any --bind", ("serve",), "HOST"),
    Option("port", in_range(0, 65535), None, "uvicorn's: serve HOST:PORT (host 127.0.0.1 when only --port "
           "is given; 0: any free port)", ("serve",), "PORT"),
    Option("uds", to_path, None, "uvicorn's: serve this unix socket (as --bind unix:PATH)", ("serve",),
           "PATH"),
    Option("fd", in_range(0, 1 << 20), None, "uvicorn's: serve the listening socket inherited as "
           "descriptor N (as --bind fd://N)", ("serve",), "N"),
    Option("policy", choice(POLICIES), None, "how connections are spread over the workers: reuseport (one "
           "kernel-balanced socket per worker; serve's default), rr (the primary hands them out; run's "
           "default, as Node's), least_conn, none (one shared socket)",
           metavar="|".join(POLICIES)),
    Option("interface", choice(INTERFACES), "auto", "the app's interface (detected by default)", ("serve",),
           "auto|asgi|wsgi"),
    Option("factory", to_bool, False, "APP is a function returning the app", ("serve",), flag=True),
    Option("preload", to_bool, True, "import the app once in a template process per code version and fork "
           "the workers from it (they start in milliseconds and share its memory); a reload imports the "
           "new code in a new template first, and keeps the old workers if that import fails. The "
           "primary never imports the app. On by default; --no-preload: each worker imports the app "
           "itself (an app that opens connections at import and cannot reopen them in post_fork)",
           ("serve",), flag=True),
    Option("spare_template", to_bool, True, "with --preload, keep a spare template that has imported the "
           "serving machinery (uvicorn, uvloop) but not the app, so a reload imports the app alone: about "
           "0.1 s faster, for one idle interpreter's memory (~20 MB private here); a new spare starts "
           "a second after each reload", ("serve",), flag=True),
    Option("reload", to_bool, False, "development: a rolling reload of every worker when a file under "
           "--reload-dir changes (needs `pip install 'prefork[reload]'`); a save that breaks the app keeps "
           "the old workers serving", ("serve",), flag=True),
    Option("reload_dir", to_paths, [], "watch this folder for --reload (repeatable; default: the app's "
           "folder)", ("serve",), "DIR", repeat=True),
    Option("reload_include", to_paths, [], "with --reload, watch files matching this glob (repeatable; "
           "default: *.py)", ("serve",), "GLOB", repeat=True),
    Option("reload_exclude", to_paths, [], "with --reload, ignore files matching this glob (repeatable; "
           "default: .*, .py[cod], .sw.*, ~*)", ("serve",), "GLOB", repeat=True),
    Option("hooks", to_module, None, "a module (or file.py) whose functions prefork calls, named as "
           "gunicorn's server hooks: on_starting, when_ready, on_reload, on_exit, post_fork, "
           "post_worker_init, worker_exit, child_exit, nworkers_changed", metavar="MODULE"),
    Option("chdir", to_path, None, "change to this folder before starting; the primary and each new "
           "worker or template resolve it again at every start, so a symlink swapped to a new release "
           "(current -> releases/N) is followed by `ctl reload`", metavar="DIR"),
    Option("pid", to_path, None, "write the primary's pid to this file (atomically), removed on exit",
           metavar="FILE", aliases=("--pidfile",)),
    Option("user", to_str, None, "run the workers as this user (name or uid; the primary must be root)",
           metavar="USER"),
    Option("group", to_str, None, "run the workers as this group (name or gid; default: the user's)",
           metavar="GROUP"),
    Option("umask", to_umask, None, "the workers' umask, octal (e.g. 027)", metavar="MASK"),
    Option("name", to_name, None, "a name for this server: in process titles, log lines, the banner and "
           "the default control socket's file name (gunicorn's --name)", metavar="NAME"),
    Option("timeout", to_seconds, 30.0, "kill and replace a worker that does not answer the primary's "
           "heartbeat for this long (0: never)", metavar="SECONDS",
           aliases=("--timeout-worker-healthcheck",)),
    Option("graceful_timeout", to_seconds, 30.0, "how long a stopping worker may finish its requests "
           "before it is killed", metavar="SECONDS", aliases=("--timeout-graceful-shutdown",)),
    Option("ready_timeout", to_seconds, 30.0, "how long a new worker may take to be ready",
           metavar="SECONDS"),
    Option("max_requests", to_count, 0, "replace a worker after it has served this many requests (0: never)",
           metavar="N", aliases=("--limit-max-requests",)),
    Option("max_requests_jitter", to_count, 0, "add up to this many to --max-requests, per worker, so "
           "workers are not all replaced at once", metavar="N", aliases=("--limit-max-requests-jitter",)),
    Option("max_memory", to_size, None, "replace a worker whose own memory (USS: its private pages, "
           "not those shared with the preloaded app) grows beyond this (e.g. 512M)", metavar="SIZE"),
    Option("gc_threshold", in_range(0, 10**7, " (0: no automatic collection)"), 50000, "per worker: "
           "container objects allocated (net) before a young garbage collection; Python's default 700 "
           "took a tenth of a worker's CPU with thousands of keep-alive clients (0: off, as "
           "gc.disable)", ("serve",), "N"),
    Option("log_level", choice(LOG_LEVELS), "info", "critical, error, warning, info, debug (shows "
           "tracebacks) or trace", metavar="LEVEL"),
    Option("access_log", to_bool, False, "write one Common Log Format line per request to stdout",
           ("serve",), flag=True),
    Option("proxy_headers", to_bool, False, "trust X-Forwarded-For/-Proto from --forwarded-allow-ips",
           ("serve",), flag=True),
    Option("forwarded_allow_ips", to_str, "127.0.0.1", "comma-separated proxy addresses to trust ('*': "
           "all)", ("serve",), "IPS"),
    Option("root_path", to_str, "", "the ASGI root_path (the app is mounted below this URL path)",
           ("serve",), "PATH"),
    Option("certfile", to_str, None, "TLS certificate (PEM); serves HTTPS", ("serve",), "FILE",
           aliases=("--ssl-certfile",)),
    Option("keyfile", to_str, None, "TLS private key (PEM)", ("serve",), "FILE", aliases=("--ssl-keyfile",)),
    Option("ssl_keyfile_password", to_str, None, "the password of an encrypted --keyfile "
           "(PREFORK_SSL_KEYFILE_PASSWORD keeps it out of `ps`)", ("serve",), "PASSWORD"),
    Option("ssl_ca_certs", to_path, None, "CA certificates (PEM) client certificates are checked against",
           ("serve",), "FILE", aliases=("--ca-certs",)),
    Option("ssl_cert_reqs", to_cert_reqs, 0, "ask clients for a certificate: none, optional (checked when "
           "sent) or required (needs --ssl-ca-certs); 0, 1, 2 as uvicorn", ("serve",),
           "none|optional|required", aliases=("--cert-reqs",)),
    Option("ssl_ciphers", to_str, "TLSv1", "OpenSSL cipher list (uvicorn's default TLSv1: every TLS 1.x "
           "cipher OpenSSL enables; TLS 1.3's are always on)", ("serve",), "CIPHERS", aliases=("--ciphers",)),
    Option("ssl_version", to_ssl_version, "tls_server", "TLS protocol (ssl.PROTOCOL_*): tls_server "
           "(negotiates the best; default), tls, or the deprecated pinned tlsv1, tlsv1_1, tlsv1_2",
           ("serve",), "VERSION"),
    Option("threads", to_positive, 8, "threads per worker for a WSGI app", ("serve",), "N"),
    Option("header_map", choice(HEADER_MAPS), "drop", "gunicorn's: a WSGI request header whose name has "
           "an underscore (X_Remote_User) becomes the same HTTP_X_REMOTE_USER as X-Remote-User, so a "
           "client could spoof what a proxy sets: drop it (default), refuse the request (400), or keep "
           "it (dangerous)", ("serve",), "|".join(HEADER_MAPS)),
    Option("keep_alive", in_range(1, 24 * 3600), 5, "seconds an idle keep-alive connection stays open "
           "(1 to 86400)", ("serve",), "SECONDS", aliases=("--timeout-keep-alive",)),
    Option("limit_concurrency", in_range(1, MAX_CONCURRENCY), None, "per worker: once this many "
           "connections are open or requests in progress, a new request gets 503 Service Unavailable "
           "(uvicorn's; the connection asking counts, so 1 refuses everything)", ("serve",), "N"),
    Option("lifespan", choice(LIFESPANS), "auto", "run the app's ASGI lifespan: auto (if it supports it), on "
           "(a failure stops the worker), off (uvicorn's)", ("serve",), "|".join(LIFESPANS)),
    Option("ws", choice(WS), "auto", "WebSocket implementation (uvicorn's): auto, none (no upgrades), "
           "websockets, wsproto (needs `pip install wsproto`)", ("serve",), "|".join(WS)),
    Option("ws_max_size", in_range(1, 1 << 30), 16 << 20, "largest WebSocket message in bytes (1 to 1 GiB); "
           "larger closes the socket with 1009", ("serve",), "BYTES"),
    Option("ws_max_queue", in_range(1, 1 << 16), 32, "WebSocket messages queued for the app before reading "
           "stops (1 to 65536)", ("serve",), "N"),
    Option("ws_ping_interval", seconds_upto(86400, " (0: no pings)"), 20.0, "seconds between WebSocket "
           "pings (0: none)", ("serve",), "SECONDS"),
    Option("ws_ping_timeout", seconds_upto(86400, " (0: wait forever)"), 20.0, "seconds to wait for a "
           "WebSocket pong before closing (0: forever)", ("serve",), "SECONDS"),
    Option("ws_per_message_deflate", to_bool, True, "offer WebSocket per-message deflate compression",
           ("serve",), flag=True),
    Option("reset_contextvars", to_bool, False, "run each request in a fresh contextvars context, so "
           "values set in the lifespan or by instrumentation do not leak into requests (uvicorn's, needs "
           "uvicorn 0.54)", ("serve",), flag=True),
    Option("app_dir", to_path, None, "look for MODULE:APP in this folder (put first on sys.path); "
           "default: the current folder (uvicorn's --app-dir)", ("serve",), "DIR"),
    Option("env_file", to_path, None, "set the variables of this dotenv file (KEY=VALUE lines) for the "
           "app, in the primary and so in every worker; a variable already set wins (uvicorn's). Read "
           "once, at start; prefork's own PREFORK_* options are not read from it", ("serve",), "PATH"),
    Option("header", to_headers, [], "add this header to every response, NAME:VALUE; repeat for more "
           "(uvicorn's --header)", ("serve",), "NAME:VALUE", repeat=True),
    Option("server_header", to_bool, False, "say `server: prefork` in every response; off by default: "
           "naming the server helps scanners match known flaws and costs bytes on every response",
           ("serve",), flag=True),
    Option("date_header", to_bool, True, "send the `date` header, as HTTP/1.1 asks of a server with a "
           "clock (RFC 9110 6.6.1; on by default)", ("serve",), flag=True),
    Option("backlog", to_backlog, None, f"listen backlog (1 to {MAX_BACKLOG})", ("serve",), "N"),
    Option("timeout_header", seconds_upto(3600, " (0: no limit)"), 10.0, "close a connection that has not "
           "sent a whole request head (request line and headers) this many seconds after it opened or "
           "after the head began (slowloris); 0: no limit. HTTP/1 over httptools only", ("serve",),
           "SECONDS", aliases=("--http1-header-read-timeout",)),
    Option("limit_request_line", in_range(0, MAX_LINE, " (0: no limit)"), 4094, "longest request line "
           "(method, target, version) in bytes, as gunicorn; longer gets 414 URI Too Long (the target is "
           "what grows, RFC 9112 3) and the connection closes; 0: no limit", ("serve",), "BYTES"),
    Option("limit_request_fields", in_range(0, MAX_FIELDS, f" (0: {MAX_FIELDS})"), 100, "most header "
           "fields in a request, as gunicorn; more gets 431 Request Header Fields Too Large (RFC 6585) and "
           f"the connection closes; 0: {MAX_FIELDS}", ("serve",), "N"),
    Option("limit_request_field_size", in_range(0, MAX_FIELD, " (0: no limit)"), 8190, "largest header "
           "field (name and value) in bytes, as gunicorn; larger gets 431 and the connection closes, as "
           "soon as that many bytes of it have come (it is never buffered whole); 0: no limit",
           ("serve",), "BYTES", aliases=("--limit-request-field_size",)),
    Option("ready", choice(READY), "listening", "when a new worker counts as ready (for reloads): when "
           "it listens, when it is online, or when it sends 'ready'", ("run",), "|".join(READY)),
    Option("admin", to_address, None, "serve /livez, /readyz, /metrics and /status on HOST:PORT, from the "
           "primary (off by default)", metavar="HOST:PORT"),
    Option("shutdown_delay", to_seconds, 0.0, "on SIGTERM, report not ready (/readyz 503) and keep serving "
           "for this long before draining, so a load balancer stops sending first", metavar="SECONDS"),
    Option("init", to_bool, False, "reap every child that reparents to the primary, as an init process "
           "(on by itself when the primary is PID 1); also makes the primary a child subreaper "
           "(PR_SET_CHILD_SUBREAPER), so orphans of the app's subprocesses come to it, not to PID 1",
           flag=True),
    Option("log_format", choice(LOG_FORMATS), "text", "text, or json: one JSON object per line (ts, level, "
           "msg, worker) for every line prefork writes", metavar="text|json"),
    Option("access_log_format", to_str, None, "access log line with gunicorn's atoms, e.g. "
           "'%(h)s %(r)s %(s)s %(b)s %(D)s' (implies --access-log)", ("serve",), "FORMAT"),
    Option("log_config", to_path, None, "configure the workers' logging (uvicorn's and the app's loggers) "
           "from this file: a dictConfig in .json or .yaml (with PyYAML), else logging's INI format; the "
           "access log and prefork's own lines keep their own format", ("serve",), "FILE"),
    Option("log_file", to_str, None, "write the log here instead of stdout/stderr; SIGUSR1 reopens it "
           "(logrotate)", metavar="PATH"),
    Option("control", to_str, None, "control socket path (default: $XDG_RUNTIME_DIR/prefork/prefork.sock "
           "or /tmp/prefork-UID/prefork.sock)", metavar="PATH"),
    Option("check_config", to_bool, False, "check the options and import the app, then exit: 0, or 2 with "
           "the reason (gunicorn's)", ("serve",), flag=True),
    Option("print_config", to_bool, False, "print every option with its value and where it came from "
           "(flag, PREFORK_* variable, config file, default), then check as --check-config",
           ("serve",), flag=True),
    Option("app", to_str, None, "MODULE:APP (may come from the config file)", ("serve",)),
)
BY_NAME = {o.name: o for o in OPTIONS}

# `--help` shows the options in these groups, as gunicorn's settings reference does
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("binding", ("bind", "host", "port", "uds", "fd", "backlog", "policy")),
    ("the app", ("interface", "factory", "preload", "spare_template", "app_dir", "env_file", "lifespan",
                 "root_path", "threads", "header_map", "reset_contextvars")),
    ("workers", ("workers", "max_requests", "max_requests_jitter", "max_memory", "gc_threshold", "ready")),
    ("lifecycle", ("timeout", "graceful_timeout", "ready_timeout", "shutdown_delay", "init")),
    ("deploys", ("reload", "reload_dir", "reload_include", "reload_exclude", "hooks", "chdir", "pid", "user",
                 "group", "umask", "name")),
    ("HTTP", ("keep_alive", "timeout_header", "limit_request_line", "limit_request_fields",
              "limit_request_field_size", "limit_concurrency", "header", "server_header", "date_header",
              "proxy_headers", "forwarded_allow_ips")),
    ("WebSocket", ("ws", "ws_max_size", "ws_max_queue", "ws_ping_interval", "ws_ping_timeout",
                   "ws_per_message_deflate")),
    ("TLS", ("certfile", "keyfile", "ssl_keyfile_password", "ssl_ca_certs", "ssl_cert_reqs", "ssl_ciphers",
             "ssl_version")),
    ("logging", ("log_level", "access_log", "access_log_format", "log_format", "log_file", "log_config")),
    ("control and admin", ("control", "admin", "check_config", "print_config")),
)
