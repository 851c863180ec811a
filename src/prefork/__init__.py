"""prefork: the Node.js cluster model for Python.

`import prefork as cluster`. The role of this process comes from PREFORK_WORKER_ID, as Node's comes
from NODE_UNIQUE_ID: unset, this is the primary; set, a worker (and the variable is cleared so that
the worker's own children are not workers). Only the public names live here.
"""

from __future__ import annotations

import os as _os

from . import _role

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any as _Any

__version__ = "0.1.0"

SCHED_NONE = "none"
SCHED_RR = "rr"
SCHED_REUSEPORT = "reuseport"
SCHED_LEAST_CONN = "least_conn"
_POLICIES = (SCHED_RR, SCHED_NONE, SCHED_REUSEPORT, SCHED_LEAST_CONN)

# The one setting the face keeps: users assign it (`cluster.scheduling_policy = SCHED_NONE`).
scheduling_policy: str = _os.environ.get("PREFORK_SCHED_POLICY", SCHED_RR) or SCHED_RR
if scheduling_policy not in _POLICIES:
    from ._errors import config_error

    config_error(f"PREFORK_SCHED_POLICY={scheduling_policy!r}: use one of {', '.join(_POLICIES)}")


def _policy() -> str:
    import sys

    policy = getattr(sys.modules[__name__], "scheduling_policy", SCHED_RR)
    if policy not in _POLICIES:
        raise ValueError(f"scheduling_policy {policy!r}: use one of {', '.join(_POLICIES)}")
    return policy


def _start() -> None:
    """Pick the role once, as Node's cluster.js picks its primary or child module."""
    if "PREFORK_WORKER_ID" in _os.environ:
        from .child import bootstrap

        _role.become_worker(bootstrap)
    else:
        from .primary import Primary

        _role.become_primary(Primary(_role.emitter, _policy))


_start()
# Importing the submodules worker.py and settings.py made them attributes of this package, where
# they would hide the role's `worker` and `settings` (read through __getattr__ below).
for _name in ("worker", "settings"):
    if type(globals().get(_name)) is type(_os):
        del globals()[_name]


def on(event: str, fn: _Any = None) -> _Any:
    """Listen for a cluster event; with no `fn`, works as a decorator."""
    return _role.emitter.on(event, fn)


def once(event: str, fn: _Any = None) -> _Any:
    return _role.emitter.once(event, fn)


def off(event: str, fn: _Any = None) -> _Any:
    return _role.emitter.off(event, fn)


def emit(event: str, *args: _Any) -> bool:
    return _role.emitter.emit(event, *args)


def remove_all_listeners(event: str | None = None) -> _Any:
    return _role.emitter.remove_all_listeners(event)


def listeners(event: str) -> list[_Any]:
    return _role.emitter.listeners(event)


def listener_count(event: str) -> int:
    return _role.emitter.listener_count(event)


add_listener = on
remove_listener = off


def setup_primary(**opts: _Any) -> None:
    """Settings for later forks (`exec`, `args`, `exec_argv`, `cwd`, `silent`, `serialization`)."""
    _role.require_primary("setup_primary()").setup(opts)


setup_master = setup_primary


def fork(env: dict[str, str] | None = None) -> _Any:
    """Start one worker running the primary's script from the top; returns its Worker."""
    if _role.primary is None:
        raise RuntimeError("fork() can only be called in the primary")
    return _role.primary.fork(env)


def disconnect(callback: _Any = None) -> None:
    """Disconnect every worker gracefully; `callback` once all have exited."""
    if _role.primary is None:
        raise RuntimeError("disconnect() on the cluster is for the primary; use cluster.worker.disconnect()")
    _role.primary.disconnect(callback)


def listen(address: _Any, *, backlog: int | None = None, exclusive: bool = False) -> _Any:
    """A server socket shared through the primary: (host, port) or a unix socket path."""
    from .servers import listen as _listen

    return _listen(address, backlog=backlog, exclusive=exclusive)


async def start_server(client_connected_cb: _Any, host: _Any = None, port: _Any = None, **kw: _Any) -> _Any:
    """asyncio.start_server, listening through the primary."""
    from .aio import start_server as _start_server

    return await _start_server(client_connected_cb, host, port, **kw)


async def create_server(protocol_factory: _Any, host: _Any = None, port: _Any = None, **kw: _Any) -> _Any:
    """loop.create_server, listening through the primary."""
    from .aio import create_server as _create_server

    return await _create_server(protocol_factory, host, port, **kw)


_ROLE_NAMES = {
    "is_primary": lambda: not _role.is_worker(), "is_master": lambda: not _role.is_worker(),
    "isPrimary": lambda: not _role.is_worker(), "isMaster": lambda: not _role.is_worker(),
    "is_worker": _role.is_worker, "isWorker": _role.is_worker,
    "worker": lambda: _role.child.worker if _role.child is not None else None,
    "workers": lambda: _role.primary.workers if _role.primary is not None else {},
    "settings": lambda: _role.primary.settings if _role.primary is not None else {},
}


def __getattr__(name: str) -> _Any:
    """The role's names are read from the runtime (_role.py) each time; the http.server classes
    load on first use, so workers that don't need them start faster."""
    role = _ROLE_NAMES.get(name)
    if role is not None:
        return role()
    if name in ("HTTPServer", "ThreadingHTTPServer"):
        from . import httpserver

        return getattr(httpserver, name)
    if name in ("Supervisor", "supervise"):
        from . import supervisor

        return getattr(supervisor, name)
    raise AttributeError(f"module 'prefork' has no attribute {name!r}")


setupPrimary = setup_primary  # noqa: N816 - Node's spellings
setupMaster = setup_primary  # noqa: N816
