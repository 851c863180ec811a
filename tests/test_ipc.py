"""Primary <-> worker messaging in real processes: order, held messages, handles, callbacks, bad peers.

Each test writes a small cluster script into tmp_path and runs it with the project's interpreter
through the `py` fixture (conftest.py), which kills every process it started on teardown.
"""

from __future__ import annotations

import json

import pytest


def events(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("spin", ["50", "0"])
def test_messages_both_ways_held_until_the_worker_listens(py, spin: str) -> None:
    """Also with the readers' polling after a send turned off (PREFORK_IPC_SPIN_US=0)."""
    result = py.run('''
        import time
        import prefork as cluster

        if cluster.is_primary:
            w = cluster.fork()
            w.send("right after fork")            # before the worker even runs its script
            w.on("online", lambda: w.send("from online"))
            got = []

            def on_message(m, handle):
                got.append(m)
                print("primary got", m)
                if m == {"echo": "from online"}:
                    w.send({"t": "online"})        # user messages that look internal
                    w.send(["c", 1])
                    w.send({"cmd": "NODE_x"})
                    w.send("done")
                if m == "bye":
                    w.disconnect()

            w.on("message", on_message)
            cluster.on("message", lambda worker, m, h: print("cluster got", worker.id, m))
            cluster.on("exit", lambda worker, code, sig: print("exit", code, sig))
        else:
            me = cluster.worker
            me.send("hello from worker")
            time.sleep(0.5)  # the primary's first messages arrive before this listener exists
            def on_message(m, handle):
                print("worker got", json.dumps(m))
                if m == "done":
                    me.send("bye")
                else:
                    me.send({"echo": m})
            import json
            me.on("message", on_message)
    ''', timeout=20, env={"PREFORK_IPC_SPIN_US": spin})
    assert result.returncode == 0, result
    lines = events(result.stdout)
    worker_got = [line for line in lines if line.startswith("worker got")]
    assert worker_got == [
        'worker got "right after fork"',
        'worker got "from online"',
        'worker got {"t": "online"}',
        'worker got ["c", 1]',
        'worker got {"cmd": "NODE_x"}',
        'worker got "done"',
    ]
    primary_got = [line for line in lines if line.startswith("primary got")]
    assert primary_got == [
        "primary got hello from worker",
        "primary got {'echo': 'right after fork'}",
        "primary got {'echo': 'from online'}",
        "primary got {'echo': {'t': 'online'}}",
        "primary got {'echo': ['c', 1]}",
        "primary got {'echo': {'cmd': 'NODE_x'}}",
        "primary got bye",
    ]
    assert sum(line.startswith("cluster got 1 ") for line in lines) == len(primary_got)
    assert lines[-1] == "exit 0 None"


def test_sockets_passed_both_ways_are_usable(py) -> None:
    result = py.run('''
        import socket
        import prefork as cluster

        if cluster.is_primary:
            w = cluster.fork()
            here, there = socket.socketpair()
            w.send({"op": "take"}, there)
            there.close()

            def on_message(m, handle):
                if m["op"] == "wrote":
                    print("primary read", here.recv(100).decode())
                elif m["op"] == "take":
                    assert isinstance(handle, socket.socket), handle
                    handle.sendall(b"hi from primary")
                    handle.close()
                    w.send({"op": "sent"})
                elif m["op"] == "read":
                    print("worker said it read", m["data"])
                    w.kill()

            w.on("message", on_message)
        else:
            me = cluster.worker
            mine, theirs = socket.socketpair()

            def on_message(m, handle):
                if m["op"] == "take":
                    assert isinstance(handle, socket.socket), handle
                    handle.sendall(b"hi from worker")
                    handle.close()
                    me.send({"op": "wrote"})
                    me.send({"op": "take"}, theirs)
                elif m["op"] == "sent":
                    me.send({"op": "read", "data": mine.recv(100).decode()})

            me.on("message", on_message)
    ''', timeout=20)
    assert result.returncode == 0, result
    assert "primary read hi from worker" in result.stdout
    assert "worker said it read hi from primary" in result.stdout


def test_send_callback_runs_once_per_message(py) -> None:
    result = py.run('''
        import threading
        import prefork as cluster

        N = 300
        if cluster.is_primary:
            w = cluster.fork()
            calls = []
            lock = threading.Lock()

            def cb_for(i):
                def cb():
                    with lock:
                        calls.append(i)
                return cb

            big = "b" * 200000  # some of these cannot be written at once: the queued path
            sent = [w.send([i, big if i % 10 == 0 else ""], callback=cb_for(i)) for i in range(N)]
            assert sent[0] is True and set(sent) <= {True, False}  # False once backed up, yet queued

            def on_message(m, handle):
                print("worker counted", m["count"], "worker callbacks", m["callbacks"])
                with lock:
                    print("primary callbacks", len(calls), "distinct", len(set(calls)),
                          "in order", calls == sorted(calls))
                w.kill()

            w.on("message", on_message)
        else:
            me = cluster.worker
            seen = []
            wcalls = []

            def on_message(m, handle):
                seen.append(m[0])
                if len(seen) == N:
                    for _ in range(5):
                        me.send("x", callback=lambda: wcalls.append(1))
                    me.send({"count": len(seen), "callbacks": len(wcalls)})

            me.on("message", on_message)
    ''', timeout=20)
    assert result.returncode == 0, result
    assert "worker counted 300 worker callbacks 5" in result.stdout
    assert "primary callbacks 300 distinct 300 in order True" in result.stdout


def test_send_after_the_worker_disconnected_returns_false_and_emits_error(py) -> None:
    result = py.run('''
        import prefork as cluster

        if cluster.is_primary:
            w = cluster.fork()
            w.on("error", lambda exc: print("error event", type(exc).__name__))

            def on_disconnect():
                print("send after disconnect", w.send("late"), w.is_connected())

            w.on("disconnect", on_disconnect)
            w.on("exit", lambda code, sig: print("exit", code, sig))
        else:
            import threading
            me = cluster.worker
            errored = threading.Event()

            def gone():
                print("worker send after disconnect", me.send("late"))

            def on_error(exc):
                print("worker error event", type(exc).__name__)
                errored.set()

            me.on("disconnect", gone)
            me.on("error", on_error)
            me.disconnect()
            # 'error' is emitted from a helper thread: don't let the interpreter end under it
            errored.wait(10)
    ''', timeout=20)
    assert result.returncode == 0, result
    lines = events(result.stdout)
    assert "send after disconnect False False" in lines
    assert "error event ChannelClosed" in lines
    assert "worker send after disconnect False" in lines
    assert "worker error event ChannelClosed" in lines
    assert "exit 0 None" in lines


def test_garbage_on_the_channel_closes_it_and_the_primary_lives_on(py) -> None:
    result = py.run('''
        import os
        import sys
        CHANNEL_FD = os.environ.get("PREFORK_CHANNEL_FD")  # popped when prefork is imported
        import prefork as cluster

        if cluster.is_primary:
            bad = cluster.fork({"ROLE": "bad"})
            bad.on("error", lambda exc: print("error event", type(exc).__name__))
            bad.on("disconnect", lambda: print("bad disconnected"))

            def on_exit(worker, code, sig):
                print("exit", worker.id, code, sig)
                if worker is bad:
                    good = cluster.fork({"ROLE": "good"})
                    good.on("message", lambda m, h: (print("good says", m), good.kill()))
                    good.send("still here?")

            cluster.on("exit", on_exit)
        elif os.environ["ROLE"] == "bad":
            os.write(int(CHANNEL_FD), b"\\xff" * 64)
            import time
            time.sleep(10)  # ended by the orphan rule once the primary closes the channel
        else:
            cluster.worker.on("message", lambda m, h: cluster.worker.send("yes: " + m))
    ''', timeout=20)
    assert result.returncode == 0, result
    lines = events(result.stdout)
    assert "error event ProtocolError" in lines
    assert "bad disconnected" in lines
    assert "good says yes: still here?" in lines
    assert lines.index("error event ProtocolError") < lines.index("bad disconnected")
    assert any(line.startswith("exit 1 ") for line in lines)


def test_pickle_serialization(py) -> None:
    result = py.run('''
        import prefork as cluster

        if cluster.is_primary:
            cluster.setup_primary(serialization="pickle")
            w = cluster.fork()
            value = {"set": {1, 2, 3}, "tuple": (1, "a"), "bytes": b"\\x00\\xff", (1, 2): frozenset({3})}
            w.send(value)

            def on_message(m, handle):
                print("round trip equal", m == value, type(m["set"]).__name__, type(m["tuple"]).__name__)
                w.kill()

            w.on("message", on_message)
        else:
            cluster.worker.on("message", lambda m, h: cluster.worker.send(m))
    ''', timeout=20)
    assert result.returncode == 0, result
    assert "round trip equal True set tuple" in result.stdout


def test_64_mib_message_to_the_worker_and_back(py) -> None:
    result = py.run('''
        import json
        import time
        import prefork as cluster

        SIZE = 64 * 1024 * 1024
        if cluster.is_primary:
            cluster.setup_primary(max_message_size=SIZE + 1024)  # over the default limit (64 MiB)
            w = cluster.fork()
            big = {"s": "m" * SIZE, "tail": "end"}
            t0 = time.monotonic()
            w.send(big)

            def on_message(m, handle):
                ok = m == big
                print(json.dumps({"equal": ok, "len": len(m["s"]), "s": round(time.monotonic() - t0, 2)}))
                w.kill()

            w.on("message", on_message)
        else:
            cluster.worker.on("message", lambda m, h: cluster.worker.send(m))
    ''', timeout=40)
    assert result.returncode == 0, result
    report = json.loads(events(result.stdout)[-1])
    assert report["equal"] is True and report["len"] == 64 * 1024 * 1024
