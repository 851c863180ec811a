"""--hooks MODULE: a user's module whose functions prefork calls, named as gunicorn's server hooks.

In the primary, on its loop thread (the module is a supervisor watcher, see supervisor.py `tell`):
    on_starting(server)              main thread, before any worker starts; if it raises, prefork
                                     stops at once (one line, exit 1)
    when_ready(server)               the first full set of workers is ready
    on_reload(server)                a rolling reload begins
    nworkers_changed(server, new, old)  at start (old None) and on every scale
    child_exit(server, worker)       a worker process has exited (any way), `worker` prefork's Worker
    on_exit(server)                  just before the primary exits (main thread, pool stopped)
In each worker, before it serves:
    post_fork(server, worker)        right after the worker process starts (before the app is
                                     imported, unless preloaded): reconnect what a fork shares
    post_worker_init(worker)         once the app is loaded
    worker_exit(server, worker)      once it has stopped serving
A hook that raises is logged with its traceback and stops nothing (but on_starting).

`server` in the primary is a HookServer; in a worker a WorkerServer (the primary's pid, cfg, app).
`worker` in a worker is `prefork.worker`. Workers learn the module from PREFORK_HOOKS (JSON), taken
out of the environment once read, so it does not reach the app's own children.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import os
import sys
import traceback
import types
from collections.abc import Callable, Mapping
from typing import Any

ENV = "PREFORK_HOOKS"
PRIMARY = ("on_starting", "when_ready", "on_reload", "on_exit", "child_exit", "nworkers_changed")
WORKER = ("post_fork", "post_worker_init", "worker_exit")


class HookError(Exception):
    """The hooks module cannot be used: one line, exit 2 (cli/supervised.py)."""


def load(spec: str, base: str) -> dict[str, Callable[..., Any]]:
    """The known hooks a module defines. `spec` is a dotted name (found from `base` too) or a .py
    file (relative to `base`); other names in the module are the user's business."""
    try:
        module = _import(spec, base)
    except Exception as exc:
        raise HookError(f"--hooks {spec}: cannot load it: {type(exc).__name__}: {exc}") from None
    found = {}
    for name in PRIMARY + WORKER:
        fn = getattr(module, name, None)
        if fn is None:
            continue
        if not callable(fn):
            raise HookError(f"--hooks {spec}: {name} is a {type(fn).__name__}, not a function")
        found[name] = fn
    return found


def _import(spec: str, base: str) -> Any:
    if spec.endswith(".py") or "/" in spec:
        path = os.path.join(base, spec)  # an absolute spec stays as it is
        name = "prefork_hooks_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
        found = importlib.util.spec_from_file_location(name, path)
        if found is None or found.loader is None:
            raise ImportError(f"not a Python file: {path}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
        module = importlib.util.module_from_spec(found)
        sys.modules[name] = module  # as an import would: pickle and dataclasses look it up there
        try:
            found.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    if base not in sys.path:
        sys.path.insert(0, base)
    return importlib.import_module(spec)


class HookServer:
    """`server` in the primary's hooks: what a hook may read and do.

    pid: the primary's pid. app: serve's MODULE:APP, or run's script (with its arguments). cfg:
    the resolved options, read-only. num_workers: the workers wanted now. log(msg): one line in the
    primary's log. reload(), scale(n), stop(): as `prefork ctl` (each only starts it; they return at
    once). The primary's hooks run on its loop thread: one that blocks holds up the pool's events."""

    def __init__(self, supervisor: Any, app: str, cfg: Mapping[str, Any], log: Callable[[str], None]) -> None:
        self._supervisor = supervisor
        self.pid = os.getpid()
        self.app = app
        self.cfg = types.MappingProxyType(dict(cfg))
        self._log = log

    @property
    def num_workers(self) -> int:
        return self._supervisor.count

    def log(self, msg: str) -> None:
        self._log(str(msg))

    def reload(self) -> None:
        self._supervisor.reload()

    def scale(self, n: int) -> None:
        self._supervisor.scale(n)

    def stop(self) -> None:
        self._supervisor.stop()

    def __repr__(self) -> str:
        return f"<HookServer pid={self.pid} app={self.app!r}>"


class Hooks:
    """The primary's side: a supervisor watcher calling the user's functions (on the loop thread)."""

    def __init__(self, functions: dict[str, Callable[..., Any]], server: HookServer | None,
                 log: Callable[[str], None]) -> None:
        self.functions, self.server, self.log = functions, server, log

    def call(self, name: str, *args: Any) -> bool:
        """Run one hook if the module has it; False if it raised (logged with its traceback)."""
        fn = self.functions.get(name)
        if fn is None:
            return True
        try:
            fn(*args)
        except BaseException as exc:  # a hook's sys.exit() must not end the primary's loop either
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.log(f"hook {name} failed: {type(exc).__name__}: {exc}\n{traceback.format_exc().rstrip()}")
            return False
        return True

    def starting(self) -> bool:
        """on_starting, in the main thread; False (with one line printed) if it raised."""
        fn = self.functions.get("on_starting")
        if fn is None:
            return True
        try:
            fn(self.server)
        except Exception as exc:
            from .cli import output

            if os.environ.get("PREFORK_LOG_LEVEL", "").lower() in ("debug", "trace") or \
                    self.server is not None and self.server.cfg.get("log_level") in ("debug", "trace"):
                traceback.print_exc()
            output.error(f"hook on_starting failed: {type(exc).__name__}: {exc}")
            return False
        return True

    def started(self, supervisor: Any) -> None:
        """The pool is starting: nworkers_changed(server, n, None), on the loop, as gunicorn does."""
        if "nworkers_changed" in self.functions:
            supervisor.primary.post(self.call, "nworkers_changed", self.server, supervisor.count, None)

    def exiting(self) -> None:
        self.call("on_exit", self.server)

    # supervisor events (supervisor.py `tell`), and the cluster's exit (primary.py)
    def on_ready(self) -> None:
        self.call("when_ready", self.server)

    def on_reloading(self) -> None:
        self.call("on_reload", self.server)

    def on_scaled(self, new: int, old: int) -> None:
        self.call("nworkers_changed", self.server, new, old)

    def child_exited(self, worker: Any, code: int | None, signame: str | None) -> None:
        self.call("child_exit", self.server, worker)


def install(supervisor: Any, opts: dict[str, Any], app: str, log: Callable[[str], None]) -> Hooks:
    """Load --hooks in the primary (HookError if it cannot be used), follow the pool, and tell the
    workers (PREFORK_HOOKS). Without --hooks, a Hooks that calls nothing."""
    spec = opts.get("hooks")
    if not spec:
        return Hooks({}, None, log)
    base = opts.get("chdir") or os.getcwd()  # --chdir as given: a later start resolves it again
    functions = load(spec, base)
    server = HookServer(supervisor, app, opts, log)
    hooks = Hooks(functions, server, log)
    supervisor.watchers.append(hooks)
    if "child_exit" in functions:
        supervisor.primary.cluster.on("exit", hooks.child_exited)
    if any(name in functions for name in WORKER):
        where = os.path.join(base, spec) if spec.endswith(".py") or "/" in spec else spec
        os.environ[ENV] = json.dumps({"spec": where, "app": app, "pid": os.getpid(), "cfg": opts},
                                     default=str)
    return hooks


# -- in a worker ---------------------------------------------------------------------------------

class WorkerServer:
    """`server` in a worker's hooks: pid (the primary's), app, cfg (read-only), log(msg) (stderr)."""

    def __init__(self, pid: int, app: str, cfg: dict[str, Any]) -> None:
        self.pid, self.app, self.cfg = pid, app, types.MappingProxyType(cfg)

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def __repr__(self) -> str:
        return f"<WorkerServer pid={self.pid} app={self.app!r}>"


_worker: dict[str, Any] = {}  # the worker's hooks, loaded at its first call


def in_worker(name: str) -> None:
    """Run the worker hook `name` (post_fork, post_worker_init, worker_exit) if --hooks has it;
    each at most once per process. A failure is printed with its traceback, and serving goes on."""
    if not _worker:
        _worker.update(_load_in_worker())
    functions, server = _worker["functions"], _worker.get("server")
    fn = functions.pop(name, None)  # popped: worker_exit has two callers in a `prefork run` worker
    if fn is None:
        return
    import prefork

    args = (prefork.worker,) if name == "post_worker_init" else (server, prefork.worker)
    try:
        fn(*args)
    except Exception as exc:
        print(f"prefork: hook {name} failed: {type(exc).__name__}: {exc}\n{traceback.format_exc().rstrip()}",
              file=sys.stderr, flush=True)


def run_worker() -> None:
    """A `prefork run` worker, before its script runs (the script is the app: there is nothing to
    load first). worker_exit once it leaves: when the primary disconnects it (`disconnect`, which
    comes after its servers drained), or when its script ends with nothing left to serve."""
    in_worker("post_fork")
    in_worker("post_worker_init")
    import prefork

    if "worker_exit" in _worker["functions"] and prefork.worker is not None:
        prefork.worker.on("disconnect", lambda: in_worker("worker_exit"))
        atexit.register(in_worker, "worker_exit")


def _load_in_worker() -> dict[str, Any]:
    raw = os.environ.pop(ENV, None)
    if not raw:
        return {"functions": {}}
    try:
        told = json.loads(raw)
        functions = load(told["spec"], os.getcwd())
    except Exception as exc:  # the primary loaded it; a deploy may have broken it since
        print(f"prefork: hooks not loaded in this worker: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        return {"functions": {}}
    server = WorkerServer(int(told.get("pid") or 0), str(told.get("app", "")), told.get("cfg") or {})
    return {"functions": {k: v for k, v in functions.items() if k in WORKER}, "server": server}
