"""A worker's user callbacks run in order on one lane, while the channel keeps being read
(prefork/dispatch.py): a listener that runs long neither stops heartbeats nor reorders messages."""

from __future__ import annotations


def test_a_long_message_listener_does_not_make_the_worker_look_hung(py):
    """Heartbeats are read and answered while a `message` listener sleeps for 3 timeouts."""
    result = py.run("""
        import sys, time
        import prefork as cluster
        if cluster.is_primary:
            sup = cluster.supervise(1, timeout=1.0)  # heartbeats count once the worker is ready
            cluster.on("listening", lambda worker, address: worker.send("sleep"))
            @cluster.on("message")
            def done(worker, message, handle):
                print("listener done in worker", worker.id, flush=True)
                sup.stop()
            sys.exit(sup.wait())
        else:
            @cluster.worker.on("message")
            def slow(message, handle):
                time.sleep(3.0)
                cluster.worker.send("done")
            listener = cluster.listen(("127.0.0.1", 0))
            import threading
            threading.Event().wait()
    """, timeout=30)
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
