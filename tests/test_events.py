"""Cluster and worker events with real processes: order, arguments, exactly-once, `workers` membership."""

from __future__ import annotations

import json

# A primary that logs every event (cluster-level and worker-level) as one JSON line each.
# WORKER_BODY and ON_LISTENING/ON_ONLINE are filled in per test.
LOGGER = """
import json, os, sys, prefork as cluster

def log(*args):
    print("EV " + json.dumps(args), flush=True)

if cluster.is_primary:
    @cluster.on("fork")
    def on_fork(w):
        log("fork", w.id, w.exited_after_disconnect, w.id in cluster.workers)
        w.on("online", lambda: log("w.online", w.id))
        w.on("listening", lambda a: log("w.listening", w.id, a.address, a.port, a.address_type))
        w.on("disconnect", lambda: log("w.disconnect", w.id, w.is_connected()))
        w.on("exit", lambda code, sig: log("w.exit", w.id, code, sig))

    @cluster.on("online")
    def on_online(w):
        log("online", w.id, w.exited_after_disconnect)
        ON_ONLINE

    @cluster.on("listening")
    def on_listening(w, address):
        log("listening", w.id, address.address, address.port, address.address_type)
        ON_LISTENING

    @cluster.on("disconnect")
    def on_disconnect(w):
        log("disconnect", w.id, w.id in cluster.workers, w.is_connected())

    @cluster.on("exit")
    def on_exit(w, code, sig):
        log("exit", w.id, code, sig, w.exited_after_disconnect, w.id in cluster.workers, w.is_dead())

    for _ in range(NWORKERS):
        cluster.fork()
else:
    WORKER_BODY
"""


def script(worker_body: str, on_listening: str = "pass", on_online: str = "pass", nworkers: int = 1) -> str:
    return (LOGGER.replace("WORKER_BODY", worker_body).replace("ON_LISTENING", on_listening)
            .replace("ON_ONLINE", on_online).replace("NWORKERS", str(nworkers)))


def events(stdout: str) -> list[list]:
    return [json.loads(line[3:]) for line in stdout.splitlines() if line.startswith("EV ")]


def names(evs: list[list], wid: int) -> list[str]:
    return [e[0] for e in evs if e[1] == wid]


LISTEN_AND_STAY = "srv = cluster.listen(('127.0.0.1', 0)); cluster.worker.on('message', lambda m, h: None)"


def test_full_lifecycle_with_disconnect(py):
    result = py.run(script(LISTEN_AND_STAY, on_listening="w.disconnect()"))
    assert result.returncode == 0, result
    evs = events(result.stdout)
    order = [n for n in names(evs, 1) if not n.startswith("w.")]
    assert order == ["fork", "online", "listening", "disconnect", "exit"], evs
    worker_side = [n for n in names(evs, 1) if n.startswith("w.")]
    assert worker_side == ["w.online", "w.listening", "w.disconnect", "w.exit"], evs
    by_name = {e[0]: e for e in evs}
    assert by_name["fork"] == ["fork", 1, None, True]
    assert by_name["online"] == ["online", 1, None]
    _, _, host, port, family = by_name["listening"]
    assert host == "127.0.0.1" and isinstance(port, int) and port > 0 and family == 4
    assert by_name["w.listening"][2:] == [host, port, family]
    # At `disconnect` the worker is still in `workers`; at `exit` it has left it (both have happened).
    assert by_name["disconnect"] == ["disconnect", 1, True, False]
    assert by_name["exit"] == ["exit", 1, 0, None, True, False, True]


def test_kill_sets_exited_after_disconnect(py):
    result = py.run(script(LISTEN_AND_STAY, on_listening="w.kill()"))
    assert result.returncode == 0, result
    evs = events(result.stdout)
    assert [n for n in names(evs, 1) if not n.startswith("w.")][-2:] == ["disconnect", "exit"]
    exit_ev = next(e for e in evs if e[0] == "exit")
    assert exit_ev[2:5] == [None, "SIGTERM", True]


def test_kill_sigkill_reports_signal_name(py):
    result = py.run(script(LISTEN_AND_STAY, on_listening="w.kill('SIGKILL')"))
    assert result.returncode == 0, result
    exit_ev = next(e for e in events(result.stdout) if e[0] == "exit")
    assert exit_ev[2:5] == [None, "SIGKILL", True]
    assert next(e for e in events(result.stdout) if e[0] == "w.exit")[2:] == [None, "SIGKILL"]


def test_kill_with_signal_number(py):
    result = py.run(script(LISTEN_AND_STAY, on_listening="import signal; w.kill(signal.SIGINT)"))
    assert result.returncode == 0, result
    exit_ev = next(e for e in events(result.stdout) if e[0] == "exit")
    assert exit_ev[2:5] == [None, "SIGINT", True]


def test_crash_is_not_after_disconnect(py):
    """A worker that dies by itself: exited_after_disconnect False, disconnect still once, before exit."""
    result = py.run(script("import os; os._exit(7)"))
    assert result.returncode == 0, result
    evs = events(result.stdout)
    assert [n for n in names(evs, 1) if n in ("disconnect", "exit")] == ["disconnect", "exit"], evs
    exit_ev = next(e for e in evs if e[0] == "exit")
    assert exit_ev[2:] == [7, None, False, False, True]


def test_uncaught_exception_in_worker_exits_1(py):
    result = py.run(script("raise RuntimeError('boom in worker')"))
    assert result.returncode == 0, result  # the primary lives on, then ends with no worker left
    exit_ev = next(e for e in events(result.stdout) if e[0] == "exit")
    assert exit_ev[2:5] == [1, None, False]
    assert "boom in worker" in result.stderr


def test_worker_that_ends_its_script_exits_0_not_after_disconnect(py):
    result = py.run(script("print('bye', flush=True)"))
    assert result.returncode == 0, result
    evs = events(result.stdout)
    assert names(evs, 1).count("disconnect") == 1 and names(evs, 1).count("exit") == 1
    exit_ev = next(e for e in evs if e[0] == "exit")
    assert exit_ev[2:5] == [0, None, False]


def test_each_event_exactly_once_for_many_workers(py):
    result = py.run(script(LISTEN_AND_STAY, on_listening="w.disconnect()", nworkers=4))
    assert result.returncode == 0, result
    evs = events(result.stdout)
    for wid in (1, 2, 3, 4):
        order = [n for n in names(evs, wid) if not n.startswith("w.")]
        assert order == ["fork", "online", "listening", "disconnect", "exit"], (wid, evs)


def test_worker_side_disconnect_event(py):
    result = py.run(script("""
    w = cluster.worker
    w.on('message', lambda m, h: None)
    w.on('disconnect', lambda: print('worker saw disconnect', w.is_connected(), flush=True))
    """.strip(), on_online="w.disconnect()"))
    assert result.returncode == 0, result
    assert "worker saw disconnect False" in result.stdout


def test_exit_decorator_once_and_off(py):
    result = py.run("""
        import prefork as cluster
        if cluster.is_primary:
            seen = {"deco": 0, "once": 0, "off": 0}

            @cluster.on("exit")
            def deco(w, code, sig):
                seen["deco"] += 1
                if seen["deco"] == 3:
                    print("counts", seen, flush=True)

            @cluster.once("exit")
            def only_once(w, code, sig):
                seen["once"] += 1

            def removed(w, code, sig):
                seen["off"] += 1

            cluster.on("exit", removed)
            cluster.off("exit", removed)
            assert callable(deco), "the decorator returns the function"
            for _ in range(3):
                cluster.fork()
    """)
    assert result.returncode == 0, result
    assert "counts {'deco': 3, 'once': 1, 'off': 0}" in result.stdout


def test_exited_after_disconnect_is_none_before_exit(py):
    result = py.run("""
        import prefork as cluster
        if cluster.is_primary:
            w = cluster.fork()
            print("at fork", w.exited_after_disconnect, w.is_dead(), flush=True)
            w.on("online", lambda: print("at online", w.exited_after_disconnect, flush=True))
        else:
            pass
    """)
    assert result.returncode == 0, result
    assert "at fork None False" in result.stdout
    assert "at online None" in result.stdout


def test_message_events_both_levels(py):
    result = py.run("""
        import prefork as cluster
        if cluster.is_primary:
            w = cluster.fork()
            w.on("message", lambda m, h: print("worker-level", m, h, flush=True))

            @cluster.on("message")
            def on_message(worker, m, h):
                print("cluster-level", worker.id, m, h, flush=True)
                worker.disconnect()
        else:
            cluster.worker.send({"hi": [1, 2]})
            cluster.worker.on("message", lambda m, h: None)
    """)
    assert result.returncode == 0, result
    assert "worker-level {'hi': [1, 2]} None" in result.stdout
    assert "cluster-level 1 {'hi': [1, 2]} None" in result.stdout
