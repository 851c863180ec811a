"""The role of this process, kept in one place and read at call time.

Node's `lib/cluster.js` only picks `internal/cluster/primary` or `child`; each keeps its own state.
Here the package face (`prefork/__init__.py`) starts one runtime, a `primary.Primary` or a
`child.Child`, and records it below. Every internal module asks this module when it runs (never at
import), so a worker forked from a primary (forkstart.py) changes role by calling `become_worker`.
"""

from __future__ import annotations

from .events import EventEmitter

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

emitter: EventEmitter = EventEmitter()  # the `cluster` object's events (`prefork.on(...)`)
primary: Any = None  # primary.Primary in the primary
child: Any = None  # child.Child in a worker


def is_worker() -> bool:
    return child is not None


def become_primary(runtime: Any) -> None:
    global primary, child
    primary, child = runtime, None


def become_worker(make_child: Any) -> Any:
    """Drop the primary's runtime and listeners, then start the worker's (`make_child()`)."""
    global primary, child, emitter
    primary, child = None, None
    emitter = EventEmitter()
    child = make_child()
    return child


def require_primary(what: str) -> Any:
    if primary is None:
        raise RuntimeError(f"{what} is for the primary; this is a worker")
    return primary
