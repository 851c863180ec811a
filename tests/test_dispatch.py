"""A worker's user callbacks run in order on one lane, while the channel keeps being read
(prefork/dispatch.py): a listener that runs long neither stops heartbeats nor reorders messages."""

from __future__ import annotations

import os
import re
import time

import pytest


@pytest.mark.parametrize("idle_first", [0.0, 0.5])
def test_a_long_message_listener_does_not_make_the_worker_look_hung(py, idle_first):
    """Heartbeats are read and answered while a `message` listener sleeps for 2 timeouts (a worker
    whose beats stop is taken for hung after 1 timeout and a beat of 0.25 s); also when the worker
    was idle long enough before for its spare channel thread to sleep untimed."""
    result = py.run("""
        import sys, threading, time
        import prefork as cluster
        if cluster.is_primary:
            sup = cluster.supervise(1, timeout=1.0)  # heartbeats count once the worker is ready
            cluster.on("listening", lambda worker, address: threading.Timer({idle_first}, worker.send,
                                                                            ["sleep"]).start())
            @cluster.on("message")
            def done(worker, message, handle):
                print("listener done in worker", worker.id, flush=True)
                sup.stop()
            sys.exit(sup.wait())
        else:
            @cluster.worker.on("message")
            def slow(message, handle):
                time.sleep(2.0)
                cluster.worker.send("done")
            listener = cluster.listen(("127.0.0.1", 0))
            import threading
            threading.Event().wait()
    """.replace("{idle_first}", str(idle_first)), timeout=30)
    assert result.returncode == 0, result
    assert "listener done in worker 1" in result.stdout, result
    assert "did not answer" not in result.stderr, result.stderr


def test_messages_reach_listeners_in_order_while_some_run_long(py):
    result = py.run("""
        import time
        import prefork as cluster
        if cluster.is_primary:
            worker = cluster.fork()
            for i in range(2000):
                worker.send(i)
            worker.on("message", lambda message, handle: (print("got", message, flush=True),
                                                          worker.kill()))
        else:
            seen = []
            @cluster.worker.on("message")
            def on_message(message, handle):
                if message % 500 == 0:
                    time.sleep(0.05)  # longer than a poll: the other thread reads meanwhile
                seen.append(message)
                if len(seen) == 2000:
                    cluster.worker.send("in order" if seen == list(range(2000)) else "out of order")
    """, timeout=30)
    assert "got in order" in result.stdout, result


def _wakeups(pid: int) -> int:
    """Voluntary context switches of every thread of `pid` but its main one."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        if int(tid) == pid:
            continue
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                total += int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", f.read())[1])
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
    return total


def test_an_idle_workers_channel_threads_sleep(py):
    """With nothing to read or run, neither channel thread wakes: the spare one stops polling
    every 10 ms after a few empty looks (each wake-up would take the GIL from the serving loop)."""
    script = py.spawn("""
        import prefork as cluster
        if cluster.is_primary:
            worker = cluster.fork()
            worker.on("message", lambda message, handle: print("ready", worker.process.pid, flush=True))
        else:
            cluster.worker.send("up")
            import threading
            threading.Event().wait()
    """)
    pid = int(script.expect(r"^ready (\d+)")[1])
    script.track(pid)
    time.sleep(0.5)  # past the polls that find nothing
    before = _wakeups(pid)
    time.sleep(2.0)
    woke = _wakeups(pid) - before
    assert woke < 20, f"the channel threads woke {woke} times in 2 s of idleness (polling: about 200)"
    script.signal("SIGINT")
    script.finish()
