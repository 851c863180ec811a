"""How primaries and workers live and end, with real processes: no orphans, no zombies, exit codes."""

from __future__ import annotations

import os
import signal
import time

from conftest import pid_alive, pid_state, wait_until


def test_primary_outlives_its_top_level_then_exits_0(py):
    result = py.run("""
        import time, prefork as cluster
        if cluster.is_primary:
            cluster.on("exit", lambda w, c, s: print("exit", w.id, c, flush=True))
            cluster.fork()
            print("top level done", flush=True)
        else:
            time.sleep(1.0)
            print("worker done", flush=True)
    """)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines.index("top level done") < lines.index("worker done") < lines.index("exit 1 0"), lines


def test_primary_with_no_worker_exits_at_once(py):
    start = time.monotonic()
    result = py.run("""
        import prefork as cluster
        print("primary only", cluster.is_primary)
    """, timeout=10)
    assert result.returncode == 0, result
    assert time.monotonic() - start < 5


def test_primary_top_level_raises_exit_1_and_workers_die(py):
    script = py.spawn("""
        import os, threading, prefork as cluster
        if cluster.is_primary:
            ready = threading.Semaphore(0)
            cluster.on("online", lambda w: ready.release())
            workers = [cluster.fork() for _ in range(2)]
            for _ in workers:
                ready.acquire()
            print("pids", *[w.process.pid for w in workers], flush=True)
            raise RuntimeError("top level boom")
        else:
            cluster.worker.on("message", lambda m, h: None)  # would live forever
    """)
    m = script.expect(r"pids (\d+) (\d+)")
    pids = [int(m[1]), int(m[2])]
    script.track(*pids)
    result = script.finish(timeout=10)
    assert result.returncode == 1, result
    assert "top level boom" in result.stderr
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 5), [pid_state(p) for p in pids]


def test_exception_in_callback_is_reported_and_primary_lives(py):
    result = py.run("""
        import prefork as cluster
        if cluster.is_primary:
            @cluster.on("online")
            def bad(w):
                raise ValueError("callback boom")

            @cluster.on("online")
            def good(w):
                print("second listener still ran", flush=True)
                w.disconnect()

            cluster.on("exit", lambda w, c, s: print("exit after error", c, flush=True))
            cluster.fork()
        else:
            cluster.worker.on("message", lambda m, h: None)
    """)
    assert result.returncode == 0, result
    assert "callback boom" in result.stderr and "Traceback" in result.stderr
    assert "second listener still ran" in result.stdout
    assert "exit after error 0" in result.stdout


def test_sys_exit_in_primary_callback_ends_primary_and_workers(py):
    script = py.spawn("""
        import sys, prefork as cluster
        if cluster.is_primary:
            @cluster.on("online")
            def online(w):
                print("worker pid", w.process.pid, flush=True)
                sys.exit(3)
            cluster.fork()
        else:
            cluster.worker.on("message", lambda m, h: None)
    """)
    pid = int(script.expect(r"worker pid (\d+)")[1])
    script.track(pid)
    result = script.finish(timeout=10)
    assert result.returncode == 3, result
    assert wait_until(lambda: not pid_alive(pid), 5), pid_state(pid)


def test_sys_exit_in_worker_message_callback(py):
    result = py.run("""
        import sys, prefork as cluster
        if cluster.is_primary:
            w = cluster.fork()
            w.send("quit")
            cluster.on("exit", lambda w, c, s: print("exit", c, s, w.exited_after_disconnect, flush=True))
        else:
            def on_message(m, h):
                print("worker got", m, flush=True)
                sys.exit(4)
            cluster.worker.on("message", on_message)
    """)
    assert result.returncode == 0, result
    assert "worker got quit" in result.stdout
    assert "exit 4 None False" in result.stdout


def test_worker_with_message_listener_stays_alive_until_disconnected(py):
    result = py.run("""
        import threading, prefork as cluster
        if cluster.is_primary:
            w = cluster.fork()

            @w.on("message")
            def reply(m, h):
                print("primary got", m, flush=True)
                w.disconnect()

            # Ask only well after the worker's top level has ended.
            w.on("online", lambda: threading.Timer(1.0, w.send, ("ping",)).start())
            cluster.on("exit", lambda w, c, s: print("exit", c, s, flush=True))
        else:
            cluster.worker.on("message", lambda m, h: cluster.worker.send(m + " pong"))
            print("worker top level done", flush=True)
    """)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines.index("worker top level done") < lines.index("primary got ping pong"), lines
    assert "exit 0 None" in lines


SURVIVORS = """
    import os, threading, prefork as cluster
    if cluster.is_primary:
        ready = threading.Semaphore(0)
        cluster.on("online", lambda w: ready.release())
        ws = [cluster.fork() for _ in range(3)]
        for _ in ws:
            ready.acquire()
        print("pids", *[w.process.pid for w in ws], flush=True)
    else:
        cluster.worker.on("message", lambda m, h: None)
"""


def test_no_orphans_when_primary_is_sigkilled(py):
    script = py.spawn(SURVIVORS)
    pids = [int(p) for p in script.expect(r"pids ([\d ]+)")[1].split()]
    script.track(*pids)
    assert all(pid_alive(p) for p in pids)
    os.kill(script.pid, signal.SIGKILL)
    script.wait(5)
    start = time.monotonic()
    gone = wait_until(lambda: not any(pid_alive(p) for p in pids), 1.0, interval=0.01)
    elapsed = time.monotonic() - start
    assert gone, f"workers still alive {elapsed:.2f}s after the primary died: {[pid_state(p) for p in pids]}"


def test_no_orphans_when_primary_is_sigterm_default(py):
    """SIGTERM to a primary that doesn't handle it: the primary dies, and so do its workers."""
    script = py.spawn(SURVIVORS)
    pids = [int(p) for p in script.expect(r"pids ([\d ]+)")[1].split()]
    script.track(*pids)
    os.kill(script.pid, signal.SIGTERM)
    script.wait(10)
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 5), [pid_state(p) for p in pids]


def test_exited_worker_is_reaped_while_primary_lives(py):
    script = py.spawn("""
        import os, sys, prefork as cluster
        if cluster.is_primary:
            keeper = cluster.fork({"ROLE": "keeper"})
            quitter = cluster.fork({"ROLE": "quitter"})

            @cluster.on("exit")
            def on_exit(w, code, sig):
                print("exited", w.process.pid, code, flush=True)

            @keeper.on("message")
            def stop(m, h):
                keeper.disconnect()
        else:
            if os.environ["ROLE"] == "quitter":
                sys.exit(0)
            cluster.worker.on("message", lambda m, h: None)
    """)
    pid = int(script.expect(r"exited (\d+) 0")[1])
    time.sleep(0.3)
    assert script.proc.poll() is None, "the primary must still be running (its keeper lives)"
    state = pid_state(pid)
    assert state is None, f"exited worker {pid} is in state {state!r} (Z: a zombie, not reaped)"


SIGHUP_RELOAD = """
import os, signal, threading, time, prefork as cluster
if cluster.is_primary:
    def reload(signum, frame):
        print("Reloading...", flush=True)
        new_worker = cluster.fork()

        def replace(address):
            for wid, w in list(cluster.workers.items()):
                if wid != new_worker.id:
                    w.kill("SIGTERM")
            print("replaced by", new_worker.id, flush=True)
        new_worker.once("listening", replace)

    signal.signal(signal.SIGHUP, reload)
    cluster.on("listening", lambda w, a: print("listening", w.id, flush=True))
    cluster.on("exit", lambda w, c, s: print("exit", w.id, s, flush=True))
    cluster.fork()
    print("started master with", os.getpid(), flush=True)
    TAIL
else:
    cluster.listen(("127.0.0.1", 0))
    cluster.worker.on("message", lambda m, h: None)
"""


def _sighup_reload(py, tail: str) -> None:
    script = py.spawn(SIGHUP_RELOAD.replace("TAIL", tail))
    script.expect(r"listening 1")
    script.signal("SIGHUP")
    script.expect(r"replaced by 2")
    script.expect(r"exit 1 SIGTERM")
    script.signal("SIGHUP")
    script.expect(r"replaced by 3")
    script.expect(r"exit 2 SIGTERM")
    assert script.proc.poll() is None
    assert "Traceback" not in script.stderr, script.stderr


def test_sighup_handler_forks_after_top_level_ended(py):
    _sighup_reload(py, "pass")


def test_sighup_handler_forks_while_top_level_sleeps(py):
    _sighup_reload(py, "time.sleep(30)")


def test_public_calls_from_another_thread(py):
    """threading.Timer is the Python spelling of the seed's setTimeout: fork/send/kill from it."""
    result = py.run("""
        import threading, prefork as cluster
        if cluster.is_primary:
            def later_fork():
                w = cluster.fork()
                print("forked from timer", w.id, flush=True)
                w.on("message", lambda m, h: (print("reply", m, flush=True),
                                              threading.Timer(0.1, w.kill, ("SIGKILL",)).start()))
                threading.Timer(0.2, w.send, ("from a timer",)).start()

            cluster.on("exit", lambda w, c, s: print("exit", w.id, c, s, w.exited_after_disconnect,
                                                     flush=True))
            threading.Timer(0.2, later_fork).start()
        else:
            cluster.worker.on("message", lambda m, h: cluster.worker.send("echo " + m))
    """)
    assert result.returncode == 0, result
    assert "forked from timer 1" in result.stdout
    assert "reply echo from a timer" in result.stdout
    assert "exit 1 None SIGKILL True" in result.stdout


def test_cluster_disconnect_callback_ends_everything(py):
    result = py.run("""
        import threading, prefork as cluster
        if cluster.is_primary:
            ready = threading.Semaphore(0)
            cluster.on("listening", lambda w, a: ready.release())
            for _ in range(3):
                cluster.fork()
            for _ in range(3):
                ready.acquire()
            cluster.disconnect(lambda: print("all gone", len(cluster.workers), flush=True))
        else:
            cluster.listen(("127.0.0.1", 0))
            cluster.worker.on("message", lambda m, h: None)
    """)
    assert result.returncode == 0, result
    assert result.stdout.count("all gone 0") == 1, result
