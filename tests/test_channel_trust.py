"""The IPC channel against a peer that does not play by the rules, and its configuration.

Frame size limits, the channel's one serialization, descriptors no frame claims, backed-up queues,
bad PREFORK_* values, and the spin policy the primary asks the channel about. Real socketpairs and
real processes, as in test_channel.py.
"""

from __future__ import annotations

import array
import inspect
import os
import select
import socket
import subprocess
import threading
import time
import tracemalloc
from typing import Any

import pytest
from conftest import PYTHON

import prefork.channel as channel_module
from prefork.channel import (
    HEADER,
    KIND_INTERNAL,
    KIND_JSON,
    KIND_PICKLE,
    MAX_FDS,
    Channel,
    ProtocolError,
)

MIB = 1024 * 1024
_RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS


@pytest.fixture
def pair() -> Any:
    """(primary-style end, worker-style end) of a fresh socketpair; both closed afterwards."""
    made: list[Channel] = []

    def make(serialization: str = "json", **kw: Any) -> tuple[Channel, Channel]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ends = (Channel(a, serialization, **kw), Channel(b, serialization, blocking=True, **kw))
        made.extend(ends)
        return ends

    yield make
    for ch in made:
        ch.close()


def read_n(ch: Channel, n: int, timeout: float = 10.0) -> list[tuple[int, Any, list[int]]]:
    out: list[tuple[int, Any, list[int]]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(out)} of {n} frames arrived"
        if select.select([ch.fileno()], [], [], left)[0]:
            out.extend(ch.read_messages())
    return out


def read_once(ch: Channel) -> list[tuple[int, Any, list[int]]]:
    """One read of a non-blocking end, once something is waiting."""
    assert select.select([ch.fileno()], [], [], 10)[0], "nothing arrived"
    return ch.read_messages()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- the codec lives apart from the transport ---------------------------------------------------

def test_codec_is_its_own_module_and_the_channel_still_exports_its_names() -> None:
    from prefork import codec
    from prefork.channel import SPIN, ChannelClosed, close_fds, decode, encode, fds_in  # noqa: F401

    assert "socket" not in vars(codec)  # no transport in there
    for kind in (KIND_JSON, KIND_PICKLE, KIND_INTERNAL):
        assert codec.decode(kind, codec.encode({"a": [1, "é"]}, kind)) == {"a": [1, "é"]}
    parts = codec._dumps_json_big({"s": "x" * 10000, "t": 1})
    assert isinstance(parts, list)
    assert codec._json_decode(b"".join(parts).decode()) == {"s": "x" * 10000, "t": 1}
    buf = bytearray(b'["' + b"y" * 40000 + b'", 2]')
    assert codec._loads_long(buf, memoryview(buf), 0, len(buf)) == ["y" * 40000, 2]
    with pytest.raises(ProtocolError):
        codec.decode(KIND_JSON, b"{{")


# -- frame size limit ---------------------------------------------------------------------------

def test_a_header_claiming_a_huge_frame_is_refused_before_anything_is_allocated(pair: Any) -> None:
    primary, worker = pair()  # the default limit (64 MiB)
    claimed = 200 * MIB
    worker.sock.sendall(HEADER.pack(claimed, KIND_JSON, 0, 0) + b'"abc')
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=rf"{claimed} bytes.*limit of {64 * MIB} bytes"):
            read_n(primary, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MIB, f"{peak} bytes allocated for a frame that never came"
    with pytest.raises(ProtocolError):  # the channel stays failed
        primary.read_messages()


def test_a_message_over_the_limit_is_refused_by_the_sender_and_the_channel_lives(pair: Any) -> None:
    primary, worker = pair(max_message=MIB)
    for end in (primary, worker):
        with pytest.raises(TypeError, match=rf"of {MIB + 2} bytes exceeds .* limit of {MIB} bytes"):
            end.send_message("x" * MIB)  # two quotes make it MIB + 2
    assert primary.send_message("still usable") is True
    assert read_n(worker, 1)[0][1] == "still usable"


def test_max_message_size_setting_is_validated() -> None:
    from prefork.settings import Settings

    for bad, error in [("64M", TypeError), (True, TypeError), (1.5e6, TypeError), (100, ValueError),
                       (1 << 31, ValueError)]:
        with pytest.raises(error, match="max_message_size"):
            Settings().update({"max_message_size": bad})
    try:
        settings = Settings()
        settings.update({})
        assert settings["max_message_size"] == 64 * MIB
        settings.update({"max_message_size": 2 * MIB})
        assert settings["max_message_size"] == 2 * MIB
        with socket.socket() as sock:
            assert Channel(sock).max_message == 2 * MIB  # the primary's channels take it
    finally:
        channel_module.set_max_message(channel_module.DEFAULT_MAX_MESSAGE)


def test_the_setting_limits_both_sides_of_a_real_cluster(py: Any) -> None:
    """The worker's channel gets the primary's limit (PREFORK_MAX_MESSAGE), and both refuse more."""
    result = py.run('''
        import prefork as cluster

        if cluster.is_primary:
            cluster.setup_primary(max_message_size=100_000)
            w = cluster.fork()
            try:
                w.send("p" * 100_000)
            except TypeError as exc:
                print("primary refused:", exc)
            w.send("s" * 99_000)  # under the limit: goes

            def on_message(m, handle):
                print("primary got", m if len(m) < 200 else len(m))
                if m.startswith("worker refused"):
                    w.kill()

            w.on("message", on_message)
        else:
            me = cluster.worker

            def on_message(m, handle):
                me.send("q" * 99_000)
                try:
                    me.send("w" * 100_000)
                except TypeError as exc:
                    me.send(f"worker refused: {exc}")

            me.on("message", on_message)
    ''', timeout=20)
    assert result.returncode == 0, result
    refused = "message of 100002 bytes exceeds the channel's limit of 100000 bytes"
    assert f"primary refused: {refused}" in result.stdout
    assert "primary got 99000" in result.stdout
    assert f"primary got worker refused: {refused}" in result.stdout


# -- one serialization per channel ----------------------------------------------------------------

@pytest.mark.parametrize("serialization, frame_kind", [("json", KIND_PICKLE), ("pickle", KIND_JSON)])
def test_a_frame_of_the_other_serialization_is_a_protocol_error(pair: Any, serialization: str,
                                                                frame_kind: int) -> None:
    import pickle

    primary, worker = pair(serialization)
    payload = pickle.dumps({"a": 1}) if frame_kind == KIND_PICKLE else b'{"a":1}'
    worker.send_internal({"t": "internal frames are json"})  # on either channel
    worker.sock.sendall(HEADER.pack(len(payload), frame_kind, 0, 0) + payload)
    time.sleep(0.05)
    got = read_n(primary, 1)
    assert got == [(KIND_INTERNAL, {"t": "internal frames are json"}, [])]
    other = "pickle" if frame_kind == KIND_PICKLE else "json"
    with pytest.raises(ProtocolError, match=f"{other} frame on a {serialization} channel"):
        for _ in range(1000):  # the bad frame came with the good one, or comes next
            primary.read_messages()
            time.sleep(0.01)


# -- descriptors no frame claims --------------------------------------------------------------------

def test_descriptors_no_frame_claims_are_closed(pair: Any) -> None:
    primary, worker = pair()
    r, w = os.pipe()
    try:
        before = open_fds()
        for i in range(20):  # each frame claims none of the 200 descriptors sent with it
            frame = HEADER.pack(3, KIND_JSON, 0, 0) + b"[%d]" % (i % 10)
            worker.sock.sendmsg([frame], [(*_RIGHTS, array.array("i", [w] * 200))])
            assert [(m, fds) for _, m, fds in read_once(primary)] == [([i % 10], [])]
            assert open_fds() <= before + 1
    finally:
        os.close(r)
        os.close(w)


def test_a_partial_frame_keeps_only_the_descriptors_it_can_claim(pair: Any) -> None:
    primary, worker = pair()
    r, w = os.pipe()
    try:
        before = open_fds()
        header = HEADER.pack(2, KIND_JSON, 0, 2)
        send = worker.sock.sendmsg
        send([header[:3]], [(*_RIGHTS, array.array("i", [w] * 200))])  # an incomplete header ...
        assert read_once(primary) == []
        send([header[3:5]], [(*_RIGHTS, array.array("i", [w] * 200))])
        assert read_once(primary) == []
        assert open_fds() <= before + MAX_FDS  # ... may claim up to MAX_FDS of them
        send([header[5:]], [(*_RIGHTS, array.array("i", [w] * 100))])
        assert read_once(primary) == []
        assert open_fds() <= before + 2  # a whole header: exactly its count
        send([b"[]"])
        [(kind, message, fds)] = read_once(primary)
        assert (kind, message, len(fds)) == (KIND_JSON, [], 2)
        assert open_fds() == before + 2
        for i, fd in enumerate(fds):  # the frame's own descriptors, and they work
            os.write(fd, b"%d" % i)
            assert os.read(r, 1) == b"%d" % i
            os.close(fd)
    finally:
        os.close(r)
        os.close(w)


def test_descriptors_queued_behind_a_big_frame_reach_their_frame(pair: Any) -> None:
    """The reader closes what a partial frame cannot claim, so the sender must not let descriptors
    ride on the first byte of an earlier frame: queued behind 200 KiB, they still arrive."""
    primary, worker = pair()
    primary.on_backlog = lambda: None  # as under the primary's loop: a burst is queued, then flushed
    r, w = os.pipe()
    got: list[Any] = []
    try:
        for i in range(3):
            primary.send_message(["big", "b" * (200 * 1024)])
            primary.send_message(["fd", i], [w])
        assert primary.has_backlog()
        reader = threading.Thread(target=lambda: got.extend(read_n(worker, 6)))
        reader.start()
        deadline = time.monotonic() + 10
        while primary.has_backlog() and time.monotonic() < deadline:
            select.select([], [primary.fileno()], [], 0.05)
            primary.flush()
        reader.join(10)
        assert [(m[0], len(fds)) for _, m, fds in got] == [("big", 0), ("fd", 1)] * 3
        for _, m, fds in got[1::2]:
            os.write(fds[0], b"%d" % m[1])
            assert os.read(r, 1) == b"%d" % m[1]
    finally:
        for _, _, fds in got:
            for fd in fds:
                os.close(fd)
        os.close(r)
        os.close(w)


# -- a backed-up channel ------------------------------------------------------------------------------

def test_send_returns_false_past_the_high_water_mark_and_drops_nothing(pair: Any) -> None:
    primary, worker = pair()
    chunk = "c" * (256 * 1024)
    results = [primary.send_message([i, chunk]) for i in range(40)]  # 10 MiB, nobody reading yet
    first_false = results.index(False)
    assert all(results[:first_false]) and not any(results[first_false:])
    assert channel_module.HIGH_WATER // len(chunk) <= first_false < 40  # 4 MiB queued, and the socket's

    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.extend(read_n(worker, 40, timeout=20)))
    reader.start()
    deadline = time.monotonic() + 20
    while primary.has_backlog() and time.monotonic() < deadline:
        select.select([], [primary.fileno()], [], 0.05)
        primary.flush()
    reader.join(20)
    assert [m[0] for _, m, _ in got] == list(range(40))
    assert primary.send_message("drained") is True
    assert channel_module.HIGH_WATER == 4 * MIB


def test_worker_send_is_false_when_backed_up_and_error_only_when_closed(pair: Any) -> None:
    from prefork.worker import Worker

    class Side:
        def __init__(self) -> None:
            self.posted: list[Any] = []

        def post(self, fn: Any, *args: Any) -> None:
            self.posted.append(args)

    primary, worker_end = pair()
    side = Side()
    w = Worker(1, None, primary, side)  # type: ignore[arg-type]
    assert w.send("small") is True
    chunk = "c" * MIB
    results = [w.send(chunk) for _ in range(8)]
    assert results[0] is True and results[-1] is False and side.posted == []  # backlog: no error
    primary.close()
    assert w.send("after close") is False
    assert [args[0] for args in side.posted] == ["error"]


# -- configuration from the environment ---------------------------------------------------------------

@pytest.mark.parametrize("name, value", [
    ("PREFORK_IPC_SPIN_US", "abc"), ("PREFORK_IPC_SPIN_US", "-5"), ("PREFORK_IPC_SPIN_US", "nan"),
    ("PREFORK_IPC_SPIN_US", "inf"), ("PREFORK_MAX_MESSAGE", "lots"), ("PREFORK_MAX_MESSAGE", "10"),
])
def test_a_bad_channel_variable_is_one_line_and_exit_2(name: str, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFORK_")}
    env[name] = value
    proc = subprocess.run([PYTHON, "-c", "import prefork.channel"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"prefork: error: {name}={value!r}") and proc.stderr.count("\n") == 1


# -- the spin policy belongs to the channel -------------------------------------------------------

def test_the_channel_says_whether_its_reader_should_keep_polling(pair: Any, monkeypatch: Any) -> None:
    from prefork.loop import Loop
    from prefork.primary import Primary

    primary, worker = pair()
    primary.spin.budget, primary.spin.placed = 30.0, True  # as on two CPUs; no timing: the load may be high
    primary.spin._next_check = float("inf")
    assert primary.spin_deadline() == 0.0  # nothing sent yet
    primary.on_backlog = lambda: None
    import prefork.outbox

    monkeypatch.setattr(prefork.outbox, "BURST", 60.0)  # "right after" even when the load preempts us
    primary.send_message("one")
    primary.send_message("two")  # right after: part of a burst, queued
    assert primary.has_backlog()
    assert primary.spin_deadline() > time.monotonic()  # poll for the answer ...
    assert primary.spin_deadline() == 0.0  # ... once per message sent
    primary.flush_queued()
    assert not primary.has_backlog()
    assert [m for _, m, _ in read_n(worker, 2)] == ["one", "two"]
    primary.spin.placed = False  # one shared CPU: never poll
    primary.send_message("three")
    assert primary.spin_deadline() == 0.0
    primary.spin.placed = True
    primary.send_message("four")
    primary.close()
    assert primary.spin_deadline() == 0.0

    loop = Loop(lambda code: None)
    try:
        assert loop.has_pending() is False
        loop.call_soon(print)
        assert loop.has_pending() is True
    finally:
        loop.selector.close()
        os.close(loop._wake_fd)
    source = inspect.getsource(Primary._on_readable)
    assert "channel._" not in source and "loop._" not in source  # public methods only
