"""Options of `prefork serve` and `prefork run`: one table, read from flags, PREFORK_* variables and a
config file ([tool.prefork] in ./pyproject.toml, or --config FILE), in that order of precedence.

Every value goes through the same converter wherever it comes from, so a bad value gets the same
one-line message naming where it came from ("--workers", "PREFORK_WORKERS", "pyproject.toml").
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from typing import Any

from prefork import cpus


class UsageError(Exception):
    """Bad input from the user: one line, exit code 2."""


POLICIES = ("rr", "none", "reuseport", "least_conn")
INTERFACES = ("auto", "asgi", "asgi3", "asgi2", "wsgi")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
READY = ("listening", "online", "message")
LOG_FORMATS = ("text", "json")


# -- converters: value (str from flags/env, or a TOML value) -> checked value ---------------------


MAX_WORKERS = 1024  # far above any core count prefork is run on; a typo such as 10**20 must not fork
MAX_BACKLOG = 65535  # the kernel caps listen() at net.core.somaxconn anyway (a u32 sysctl, 4096 by default)


def to_workers(value: Any) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return cpus.usable()  # affinity and cgroup quota, not the host's count (prefork/cpus.py)
    n = _int(value)
    if n is None or not 1 <= n <= MAX_WORKERS:
        raise ValueError(f"expected a whole number of workers (1 to {MAX_WORKERS}) or 'auto', not {value!r}")
    return n


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None


def to_count(value: Any) -> int:
    n = _int(value)
    if n is None or n < 0:
        raise ValueError(f"expected a whole number (0 or more), not {value!r}")
    return n


def to_positive(value: Any) -> int:
    n = _int(value)
    if n is None or n < 1:
        raise ValueError(f"expected a whole number (1 or more), not {value!r}")
    return n


def to_backlog(value: Any) -> int:
    n = _int(value)
    if n is None or not 1 <= n <= MAX_BACKLOG:
        raise ValueError(f"expected a whole number from 1 to {MAX_BACKLOG}, not {value!r}")
    return n


def in_range(low: int, high: int, note: str = "") -> Callable[[Any], int]:
    """A whole number from low to high; `note` says what 0 means, when it means something."""
    def convert(value: Any) -> int:
        n = _int(value)
        if n is None or not low <= n <= high:
            raise ValueError(f"expected a whole number from {low} to {high}{note}, not {value!r}")
        return n
    return convert


def seconds_upto(high: float, note: str = "") -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        try:
            seconds = to_seconds(value)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds <= high:
            raise ValueError(f"expected a number of seconds from 0 to {high:g}{note}, not {value!r}")
        return seconds
    return convert


def to_seconds(value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number of seconds, not {value!r}") from None
    if seconds < 0 or seconds != seconds:
        raise ValueError(f"expected a number of seconds (0 or more), not {value!r}")
    return seconds


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, not {value!r}")


_SIZE = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
         "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def to_size(value: Any) -> int:
    """Bytes from 1048576, '512M', '1.5G' (binary units, as `ps` and `top` show memory)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE or float(m.group(1)) <= 0:
        raise ValueError(f"expected a size such as 512M or 2G, not {value!r}")
    return int(float(m.group(1)) * _SIZE[m.group(2).lower()])


def to_address(value: Any) -> list[Any]:
    """HOST:PORT for --admin (TCP only: a load balancer's or the kubelet's probes reach it)."""
    try:
        bind = parse_bind(value)
    except ValueError as exc:  # its words name every --bind form: only HOST:PORT is one here
        raise ValueError(str(exc).replace(", unix:PATH or fd://N", "").replace(" or unix:PATH", "")) from None
    if bind[0] != "tcp":
        raise ValueError(f"expected HOST:PORT (e.g. 0.0.0.0:9000), not {value!r}")
    return bind


def choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, not {value!r}")
        return text
    return convert


def to_str(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"expected text, not {value!r}")
    return str(value)


def parse_bind(text: Any) -> list[Any]:
    """HOST:PORT, [IPv6]:PORT, :PORT (every interface), PORT (127.0.0.1), unix:PATH or fd://N (an
    inherited listening socket, as systemd's socket activation passes them).

    Returns ["tcp", host, port], ["unix", path] or ["fd", n] (JSON-friendly for the workers).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected HOST:PORT, unix:PATH or fd://N, not {text!r}")
    text = text.strip()
    if text.startswith("fd://"):
        fd = text[5:]
        if not fd.isdigit() or not 0 <= int(fd) <= 1 << 20:
            raise ValueError(f"{text!r}: fd:// needs a descriptor number, e.g. fd://3")
        return ["fd", int(fd)]
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError(f"{text!r}: unix: needs a path, e.g. unix:/run/app.sock")
        return ["unix", os.path.abspath(path)]
    if text.isdigit():
        host, port_text = "127.0.0.1", text
    elif text.startswith("["):
        m = re.fullmatch(r"\[([0-9a-fA-F:.%\w]+)\]:(\d+)", text)
        if not m:
            raise ValueError(f"{text!r}: expected [IPv6]:PORT, e.g. [::1]:8000")
        host, port_text = m.group(1), m.group(2)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit() or ":" in host:
            raise ValueError(f"{text!r}: expected HOST:PORT (e.g. 127.0.0.1:8000, 0.0.0.0:80) or unix:PATH")
        host = host or "0.0.0.0"
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range (0-65535)")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV)
    except socket.gaierror:
        raise ValueError(f"{text!r}: unknown host {host!r}") from None
    return ["tcp", host, port]


def to_binds(value: Any) -> list[list[Any]]:
    items = value if isinstance(value, list) else [v for v in re.split(r"[,\s]+", str(value)) if v]
    if not items:
        raise ValueError("expected at least one HOST:PORT or unix:PATH")
    return [parse_bind(item) for item in items]


def to_host(value: Any) -> str:
    """A host name or address for --host (IPv6 with or without brackets)."""
    text = to_str(value).strip().strip("[]")
    if not text:
        raise ValueError("expected a host name or address, e.g. 0.0.0.0 or ::1")
    return str(parse_bind(f"[{text}]:0" if ":" in text else f"{text}:0")[1])


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 field names


def to_headers(value: Any) -> list[list[str]]:
    """NAME:VALUE response headers (--header, repeatable; a list in the config file, lines in
    PREFORK_HEADER) as [name, value] pairs; a name is a token, a value latin-1 with no control bytes."""
    items = value if isinstance(value, list) else [v for v in str(value).splitlines() if v.strip()]
    pairs = []
    for item in items:
        name, sep, text = to_str(item).partition(":")
        name, text = name.strip(), text.strip()
        if not sep or not _TOKEN.fullmatch(name):
            raise ValueError(f"expected NAME:VALUE with a header name such as X-Frame-Options, not {item!r}")
        if re.search(r"[\x00-\x08\x0a-\x1f\x7f]", text) or not all(ord(c) < 256 for c in text):
            raise ValueError(f"{item!r}: a header value is latin-1 text without control characters")
        pairs.append([name, text])
    return pairs


def to_path(value: Any) -> str:
    text = to_str(value)
    if not text.strip():
        raise ValueError("expected a path, e.g. /run/app.sock")
    return text


def show_bind(bind: list[Any], tls: bool = False) -> str:
    if bind[0] == "unix":
        return f"unix:{bind[1]}"
    if bind[0] == "fd":
        return f"fd://{bind[1]}"
    host = f"[{bind[1]}]" if ":" in bind[1] else bind[1]
    return f"{'https' if tls else 'http'}://{host}:{bind[2]}"


# -- the table lives in options.py; resolution below ------------------------------------------------


def __getattr__(name: str) -> Any:
    """OPTIONS, BY_NAME and Option moved to options.py (which imports the converters above):
    `from prefork.cli.config import BY_NAME` keeps working without a circular import."""
    if name in ("OPTIONS", "BY_NAME", "Option"):
        from . import options

        return getattr(options, name)
    raise AttributeError(name)


def _convert(option: Any, value: Any, where: str) -> Any:
    try:
        return option.convert(value)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None


_MAX_CONFIG = 4 << 20


def read_config_file(path: str, explicit: bool) -> dict[str, Any]:
    """The [tool.prefork] table of a pyproject.toml, or a whole prefork.toml (its top level or its
    [tool.prefork] table); {} when the default pyproject.toml does not exist."""
    text = read_text(path, f"config file {path}", _MAX_CONFIG, "a config file", missing_ok=not explicit)
    if text is None:
        return {}
    tomllib = _toml_reader(path)  # only once a file exists: Python 3.10 without tomli runs fine without one
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path}: invalid TOML: {exc}") from None
    tool = data.get("tool", {})
    if not isinstance(tool, dict):
        raise UsageError(f"config file {path}: 'tool' must be a table, not {type(tool).__name__}")
    table = tool.get("prefork")
    if table is None:
        is_pyproject = os.path.basename(path) == "pyproject.toml"
        table = {} if is_pyproject else {k: v for k, v in data.items() if k != "tool"}
    if not isinstance(table, dict):
        raise UsageError(f"config file {path}: [tool.prefork] must be a table")
    return table


def read_text(path: str, where: str, limit: int, kind: str, missing_ok: bool = False) -> str | None:
    """A file a person named, as UTF-8 text, read bounded (`--config /dev/zero` must not fill the
    memory); each problem a UsageError of one line starting with `where`. None if missing and ok."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise UsageError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{where}: is a folder, not a file") from None
    except PermissionError:
        raise UsageError(f"{where}: permission denied (cannot read it)") from None
    except OSError as exc:
        raise UsageError(f"{where}: cannot read it: {exc.strerror}") from None
    if len(raw) > limit:
        raise UsageError(f"{where}: larger than {limit >> 20} MiB, not {kind}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where}: not UTF-8 text (byte {exc.start})") from None


def _toml_reader(path: str) -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the tomli backport, a dependency there (pyproject.toml)
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise UsageError(f"config file {path}: reading TOML needs Python 3.11+ or `pip install tomli`") \
                from None
    return tomllib


def resolve(command: str, flags: dict[str, Any], config_path: str | None,
            environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Defaults < config file < PREFORK_* variables < PREFORK_CMD_ARGS < flags, each value checked.
    opts["_sources"] says where each value came from (--print-config)."""
    from . import cmdargs
    from .options import BY_NAME, OPTIONS

    environ = os.environ if environ is None else environ
    env_flags, env_config = cmdargs.read(command, environ)  # PREFORK_CMD_ARGS, just below the flags
    config_path = config_path or env_config
    explicit = config_path is not None
    path = config_path or environ.get("PREFORK_CONFIG") or "pyproject.toml"
    if config_path is None and "PREFORK_CONFIG" in environ:
        explicit = True
    table = read_config_file(path, explicit)
    out: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        if command not in option.commands:
            continue
        default = option.default
        out[option.name] = option.convert(default) if default is not None else None
    where_file = os.path.basename(path) if not explicit else path
    for key, value in table.items():
        name = key.replace("-", "_")
        option = BY_NAME.get(name)
        if option is None or command not in option.commands:
            if option is None:
                raise UsageError(f"config file {path}: unknown setting {key!r}")
            continue  # a setting for the other command
        out[name] = _convert(option, value, f"{where_file} [tool.prefork] {key}")
        sources[name] = f"{where_file} [tool.prefork] {key}"
    if "WEB_CONCURRENCY" in environ:
        # gunicorn's and uvicorn's variable (set by PaaS hosts): checked even when unused, as PREFORK_*
        # are, and the weakest source of the worker count
        workers = _convert(BY_NAME["workers"], environ["WEB_CONCURRENCY"], "WEB_CONCURRENCY")
        if "workers" not in table and "PREFORK_WORKERS" not in environ:
            out["workers"] = workers
            sources["workers"] = "WEB_CONCURRENCY"
    for option in OPTIONS:
        if command not in option.commands or option.name in ("app",):
            continue
        var = "PREFORK_" + option.name.upper()
        if var in environ:
            out[option.name] = _convert(option, environ[var], var)
            sources[option.name] = var
    cmdargs.apply(out, sources, env_flags)
    for name, value in flags.items():
        option = BY_NAME[name]
        flag = "--" + name.replace("_", "-")
        if option.repeat:
            out[name] = [_convert(option, [v], flag)[0] for v in value]
        else:
            out[name] = value if isinstance(value, bool) else _convert(option, value, flag)
        sources[name] = flag
    if command == "serve":
        bind_given = "bind" in table or "PREFORK_BIND" in environ or "bind" in flags or "bind" in env_flags
        _alias_binds(out, bind_given)
        given = [sources[n] for n in ("bind", "host", "port", "uds", "fd") if n in sources]
        if given:
            sources["bind"] = ", ".join(given)
    out["_sources"] = sources  # the rest: defaults
    return out


def _alias_binds(out: dict[str, Any], bind_given: bool) -> None:
    """uvicorn's --host/--port, --uds and --fd add to the --bind addresses (and replace the default
    one when no --bind was given); --host alone serves port 8000, --port alone host 127.0.0.1."""
    extra: list[list[Any]] = []
    if out.get("host") is not None or out.get("port") is not None:
        host = out.get("host") or "127.0.0.1"
        extra.append(parse_bind(f"{f'[{host}]' if ':' in host else host}:{out.get('port') or 8000}"))
    if out.get("uds") is not None:
        extra.append(parse_bind(f"unix:{out['uds']}"))
    if out.get("fd") is not None:
        extra.append(["fd", out["fd"]])
    if extra:
        out["bind"] = (out["bind"] if bind_given else []) + extra
