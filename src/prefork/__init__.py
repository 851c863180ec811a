"""prefork: the Node.js cluster model for Python.

`import prefork as cluster`. The role of this process comes from PREFORK_WORKER_ID, as Node's comes
from NODE_UNIQUE_ID: unset, this is the primary; set, a worker (and the variable is cleared so that
the worker's own children are not workers). Only the public names live here.
"""

from __future__ import annotations

import os as _os

from .events import EventEmitter as _EventEmitter

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any as _Any

__version__ = "0.1.0"

SCHED_NONE = "none"
SCHED_RR = "rr"
SCHED_REUSEPORT = "reuseport"
SCHED_LEAST_CONN = "least_conn"
_POLICIES = (SCHED_RR, SCHED_NONE, SCHED_REUSEPORT, SCHED_LEAST_CONN)

is_worker: bool = "PREFORK_WORKER_ID" in _os.environ
is_primary: bool = not is_worker
is_master: bool = is_primary

scheduling_policy: str = _os.environ.get("PREFORK_SCHED_POLICY", SCHED_RR) or SCHED_RR
if scheduling_policy not in _POLICIES:
    raise ValueError(f"PREFORK_SCHED_POLICY={scheduling_policy!r}: use one of {', '.join(_POLICIES)}")

_cluster = _EventEmitter()
on = _cluster.on
once = _cluster.once
off = _cluster.off
emit = _cluster.emit
add_listener = _cluster.on
remove_listener = _cluster.off
remove_all_listeners = _cluster.remove_all_listeners
listeners = _cluster.listeners
listener_count = _cluster.listener_count


def _policy() -> str:
    import sys

    policy = getattr(sys.modules[__name__], "scheduling_policy", SCHED_RR)
    if policy not in _POLICIES:
        raise ValueError(f"scheduling_policy {policy!r}: use one of {', '.join(_POLICIES)}")
    return policy


if is_primary:
    from .primary import Primary as _Primary

    _primary: _Any = _Primary(_cluster, _policy)
    _child: _Any = None
    workers: dict[int, _Any] = _primary.workers
    settings: _Any = _primary.settings
    worker: _Any = None
else:
    from .child import bootstrap as _bootstrap

    _primary = None
    _child = _bootstrap()
    workers = {}
    settings = {}
    worker = _child.worker


def setup_primary(**opts: _Any) -> None:
    """Settings for later forks (`exec`, `args`, `exec_argv`, `cwd`, `silent`, `serialization`)."""
    if _primary is None:
        raise RuntimeError("setup_primary() is for the primary; this is a worker")
    _primary.setup(opts)


setup_master = setup_primary


def fork(env: dict[str, str] | None = None) -> _Any:
    """Start one worker running the primary's script from the top; returns its Worker."""
    if _primary is None:
        raise RuntimeError("fork() can only be called in the primary")
    return _primary.fork(env)


def disconnect(callback: _Any = None) -> None:
    """Disconnect every worker gracefully; `callback` once all have exited."""
    if _primary is None:
        raise RuntimeError("disconnect() on the cluster is for the primary; use cluster.worker.disconnect()")
    _primary.disconnect(callback)


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


def __getattr__(name: str) -> _Any:
    """The http.server classes load on first use, so workers that don't need them start faster."""
    if name in ("HTTPServer", "ThreadingHTTPServer"):
        from . import httpserver

        return getattr(httpserver, name)
    if name in ("Supervisor", "supervise"):
        from . import supervisor

        return getattr(supervisor, name)
    raise AttributeError(f"module 'prefork' has no attribute {name!r}")


isMaster = is_master  # noqa: N816 - Node's spellings
isPrimary = is_primary  # noqa: N816
isWorker = is_worker  # noqa: N816
setupPrimary = setup_primary  # noqa: N816
setupMaster = setup_primary  # noqa: N816
