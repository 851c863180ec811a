"""A --hooks module for tests/test_hooks.py: each hook appends one JSON line to $HOOKS_LOG, with
what it was given; $HOOKS_RAISE names hooks that raise after recording."""

import json
import os

import prefork


def _record(name, **fields):
    fields.update(hook=name, pid=os.getpid())
    with open(os.environ["HOOKS_LOG"], "a") as f:
        f.write(json.dumps(fields, default=str) + "\n")
    if name in os.environ.get("HOOKS_RAISE", "").split(","):
        raise RuntimeError(f"{name} was told to fail")


def _server(server):
    return {"server_pid": server.pid, "app": server.app, "workers_cfg": server.cfg.get("workers"),
            "server_type": type(server).__name__}


def on_starting(server):
    _record("on_starting", num_workers=server.num_workers, **_server(server))


def when_ready(server):
    _record("when_ready", num_workers=server.num_workers, **_server(server))


def on_reload(server):
    _record("on_reload", **_server(server))


def on_exit(server):
    _record("on_exit", **_server(server))


def nworkers_changed(server, new, old):
    _record("nworkers_changed", new=new, old=old, **_server(server))


def child_exit(server, worker):
    _record("child_exit", worker_id=worker.id, worker_pid=worker.process.pid, **_server(server))


def post_fork(server, worker):
    _record("post_fork", worker_id=worker.id, is_worker=prefork.is_worker,
            app_loaded="tests.apps.hello" in __import__("sys").modules, **_server(server))


def post_worker_init(worker):
    _record("post_worker_init", worker_id=worker.id,
            app_loaded="tests.apps.hello" in __import__("sys").modules,
            env_left=[k for k in os.environ if k.startswith("PREFORK_")])


def worker_exit(server, worker):
    _record("worker_exit", worker_id=worker.id, **_server(server))


not_a_hook = 42  # other names are the module's business
