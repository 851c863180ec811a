"""What a worker sends is checked at the boundary (prefork/protocol.py): a malformed internal
message costs that worker an error, never the primary its supervision, and every call is answered.

The worker scripts reach prefork's internals only to send what a buggy or hostile worker would.
"""

from __future__ import annotations

import json
import re

SHIM = """
import prefork
from prefork import servers
try:
    from prefork import _role
    CHILD = _role.child
except ImportError:  # the layout before _role.py, so that these tests run against it too
    CHILD = prefork._child
ASK = CHILD.requests.ask if hasattr(CHILD, "requests") else servers._requests.ask


def ANSWER(reply, fds):
    if reply.get("err"):
        raise OSError(*reply["err"])
    return reply
"""


def test_fatal_without_its_keys_still_gets_the_slot_restarted(py):
    result = py.run("""
        import os, sys
        import prefork as cluster
        if cluster.is_primary:
            sup = cluster.supervise(1)
            seen = []
            @cluster.on("listening")
            def listening(worker, address):
                seen.append(worker.id)
                print("listening", worker.id, flush=True)
                sup.stop()
            sys.exit(sup.wait())
        else:
    """ + SHIM.replace("\n", "\n            ") + """
            if cluster.worker.id == 1:
                CHILD.channel.send_internal({"t": "fatal"})
                os._exit(1)
            cluster.listen(("127.0.0.1", 0))
            import threading
            threading.Event().wait()
    """, timeout=20)
    assert "listening 2" in result.stdout, result
    assert result.returncode == 0, result
    assert "Traceback" not in result.stderr, result.stderr


def test_bad_heartbeat_counters_do_not_break_status_or_beats(py):
    result = py.run("""
        import sys, time
        import prefork as cluster
        if cluster.is_primary:
            # beats every second, each answered with garbage by worker 1; status is read well before
            # the timeout could take worker 1 for hung (at 3.0 it raced with that kill and respawn)
            sup = cluster.supervise(2, timeout=6.0)
            time.sleep(3.0)
            status = sup.status()
            print("workers", len(status["workers"]), "ids", sorted(w["id"] for w in status["workers"]),
                  flush=True)
            sup.stop()
            sys.exit(sup.wait())
        else:
    """ + SHIM.replace("\n", "\n            ") + """
            import threading
            if cluster.worker.id == 1:
                CHILD.heartbeat_responder = lambda pong: CHILD.channel.send_internal(["P", "garbage"])
            cluster.listen(("127.0.0.1", 0))
            threading.Event().wait()
    """, timeout=30)
    assert result.returncode == 0, result
    assert "workers 2" in result.stdout, result
    ids = json.loads(re.search(r"ids (\[.*\])", result.stdout)[1])
    assert ids == [1, 2], result  # garbage answers neither broke the status nor ended the beats
    assert "Traceback" not in result.stderr, result.stderr


def test_every_listen_call_is_answered(py):
    """A backlog too big for the kernel, a port out of range, a family that does not exist and
    garbage: each listen() call ends with an error, at once, and the worker can listen after."""
    result = py.run("""
        import sys
        import prefork as cluster
        if cluster.is_primary:
            cluster.fork()
        else:
    """ + SHIM.replace("\n", "\n            ") + """
            try:
                cluster.listen(("127.0.0.1", 0), backlog=10**20)
            except (OSError, ValueError, OverflowError) as exc:
                print("backlog refused", type(exc).__name__, flush=True)
            bad = [{"family": 2, "addr": ["127.0.0.1", 0], "backlog": 10**20, "policy": "rr"},
                   {"family": 2, "addr": ["127.0.0.1", 70000], "backlog": None, "policy": "none"},
                   {"family": 12345, "addr": "x", "backlog": None, "policy": "rr"},
                   {"family": 2, "addr": [[]], "backlog": "z", "policy": "rr"}]
            for request in bad:
                try:
                    ASK(CHILD.channel, {"t": "listen", **request}, ANSWER)
                    print("accepted?!", request, flush=True)
                except OSError as exc:
                    print("refused", exc.errno, flush=True)
            with cluster.listen(("127.0.0.1", 0)) as listener:
                print("listening on", listener.getsockname()[1], flush=True)
            cluster.worker.disconnect()
    """, timeout=20)
    assert "backlog refused" in result.stdout, result
    assert result.stdout.count("refused 22") == 4, result
    assert "listening on" in result.stdout, result
    assert result.returncode == 0, result


def test_handle_that_is_not_a_socket_is_closed_and_the_message_delivered(py):
    result = py.run("""
        import os, sys
        import prefork as cluster
        if cluster.is_primary:
            got = []
            def fds():
                return len(os.listdir("/proc/self/fd"))
            @cluster.on("message")
            def on_message(worker, message, handle):
                got.append(handle)
                if message == "before":
                    got.clear()
                    print("fds before", fds(), flush=True)
                elif message == "done":
                    print("fds after", fds(), "handles", sorted({repr(h) for h in got}), flush=True)
                    worker.kill()
            cluster.fork()
        else:
            cluster.worker.send("before")
            for _ in range(50):
                r, w = os.pipe()
                cluster.worker.send("pipe", handle=r)
                os.close(r)
                os.close(w)
            cluster.worker.send("done")
    """, timeout=20)
    before = int(re.search(r"fds before (\d+)", result.stdout)[1])
    after = int(re.search(r"fds after (\d+)", result.stdout)[1])
    assert after <= before + 2, result
    assert "handles ['None']" in result.stdout, result
    assert "Traceback" not in result.stderr, result.stderr


def test_listen_from_a_message_listener_does_not_deadlock(py):
    """The listener runs while the worker's channel reader is free to read listen()'s answer."""
    result = py.run("""
        import prefork as cluster
        if cluster.is_primary:
            @cluster.on("message")
            def reply(worker, message, handle):
                if message == "ready":
                    worker.send("listen now")
                    return
                print("worker listens on", message, flush=True)
                worker.disconnect()
            cluster.fork()
        else:
            @cluster.worker.on("message")
            def on_message(message, handle):
                listener = cluster.listen(("127.0.0.1", 0))
                cluster.worker.send(listener.getsockname()[1])
            cluster.worker.send("ready")  # the listener is in place: the next message goes to it
    """, timeout=20)
    assert re.search(r"worker listens on \d+", result.stdout), result
    assert result.returncode == 0, result


def test_fork_start_after_the_primary_imported_the_server_modules(py):
    """setup_primary(start="fork") in a primary that imported prefork.servers and prefork.aio:
    the forked worker's listen() and its connection counts use the worker's own runtime."""
    result = py.run("""
        import asyncio, socket, sys, time
        import prefork as cluster
        import prefork.servers, prefork.aio  # noqa: F401 - what the fault needed

        def serve():
            async def main():
                async def handle(reader, writer):
                    writer.write(b"hi")
                    await writer.drain()
                    writer.close()
                server = await cluster.start_server(handle, "127.0.0.1", 0)
                print("port", server.sockets[0].getsockname()[1], flush=True)
                await asyncio.Event().wait()
            asyncio.run(main())

        ports = []
        cluster.on("listening", lambda worker, address: ports.append(address.port))
        cluster.setup_primary(start="fork", target=serve)
        sup = cluster.supervise(1)
        deadline = time.monotonic() + 15
        while not ports and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", ports[0]), timeout=5) as conn:
            print("answer", conn.recv(10), flush=True)
        while time.monotonic() < deadline:
            time.sleep(0.2)  # the count reaches the primary with the next heartbeat
            if sup.status()["workers"][0]["connections"] >= 1:
                print("counted", flush=True)
                break
        sup.stop()
        sys.exit(sup.wait())
    """, timeout=30)
    assert "answer b'hi'" in result.stdout, result
    assert "counted" in result.stdout, result
    assert result.returncode == 0, result
