"""The IPC channel on its own: framing, serializers, fd passing, bad peers and queued writes.

Real socketpairs, no fork: one end is set up as the primary's (non-blocking, queued writes) or the
worker's (blocking), and the test plays the other side, with threads where both ends must move.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import socket
import struct
import threading
import time
from typing import Any

import pytest

from prefork.channel import (
    HEADER,
    KIND_INTERNAL,
    KIND_JSON,
    KIND_PICKLE,
    MAX_FDS,
    Channel,
    ChannelClosed,
    ProtocolError,
)

MIB = 1024 * 1024


@pytest.fixture
def pair() -> Any:
    """(primary-style end, worker-style end) of a fresh socketpair; both closed afterwards."""
    made: list[Channel] = []

    def make(serialization: str = "json", max_message: int | None = None,
             **kw: Any) -> tuple[Channel, Channel]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ends = (Channel(a, serialization, max_message=max_message),
                Channel(b, serialization, blocking=True, max_message=max_message, **kw))
        made.extend(ends)
        return ends

    yield make
    for ch in made:
        ch.close()


def read_n(ch: Channel, n: int, timeout: float = 10.0, raw: bool = False) -> list[tuple[int, Any, list[int]]]:
    """Read until `n` frames came (decoded unless raw); a non-blocking end waits with select."""
    out: list[tuple[int, Any, list[int]]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(out)} of {n} frames arrived"
        if not select.select([ch.fileno()], [], [], left)[0]:
            continue
        out.extend(ch.read() if raw else ch.read_messages())
    return out


def pump(ch: Channel, stop: threading.Event) -> None:
    """What the primary's loop does for a non-blocking end: flush when writable."""
    while ch.has_backlog() and not stop.is_set():
        select.select([], [ch.fileno()], [], 0.05)
        ch.flush()


# -- framing and serializers -----------------------------------------------------------------------

@pytest.mark.parametrize("serialization", ["json", "pickle"])
def test_order_kept_over_many_messages(pair: Any, serialization: str) -> None:
    primary, worker = pair(serialization)
    n = 20000
    sizes = [0, 1, 7, 100, 5000, 70000]

    def sender() -> None:
        for i in range(n):
            worker.send_message({"i": i, "pad": "p" * sizes[i % len(sizes)]})

    t = threading.Thread(target=sender)
    t.start()
    got = read_n(primary, n, timeout=30)
    t.join(10)
    assert [m["i"] for _, m, _ in got] == list(range(n))
    assert all(kind == (KIND_PICKLE if serialization == "pickle" else KIND_JSON) for kind, _, _ in got)
    assert all(len(m["pad"]) == sizes[m["i"] % len(sizes)] for _, m, _ in got)

    # and the other way, through the non-blocking end's queue
    stop = threading.Event()
    sent = [primary.send_message([i, "q" * sizes[i % len(sizes)]]) for i in range(n)]
    backed_up = sent.index(False)  # nobody reads yet: past HIGH_WATER queued bytes, False (yet queued)
    assert backed_up > 0 and all(sent[:backed_up]) and not any(sent[backed_up:])
    flusher = threading.Thread(target=pump, args=(primary, stop))
    flusher.start()
    got = []
    while len(got) < n:
        got.extend(worker.read_messages())
    stop.set()
    flusher.join(10)
    assert [m[0] for _, m, _ in got] == list(range(n))


def test_json_values_round_trip(pair: Any) -> None:
    primary, worker = pair("json")
    values = [None, True, 0, -5, 2**60, 1.5, "", "héllo ✓ 😀", [], {}, [1, [2, [3]]],
              {"a": {"b": [None, "x"]}, "k": 1}, "\x00\n\"\\", 1e300]
    for v in values:
        primary.send_message(v)
    assert [m for _, m, _ in read_n(worker, len(values))] == values


def test_pickle_values_round_trip(pair: Any) -> None:
    primary, worker = pair("pickle")
    values = [{1, 2, 3}, (1, "a"), b"\x00\xff" * 10, {"nested": {(1, 2): frozenset({3})}}, 3 + 4j]
    for v in values:
        worker.send_message(v)
    assert [m for _, m, _ in read_n(primary, len(values))] == values
    # read() gives the raw payloads
    worker.send_message({"a": 1})
    [(kind, payload, fds)] = read_n(primary, 1, raw=True)
    assert kind == KIND_PICKLE and isinstance(payload, bytes) and fds == []


@pytest.mark.timeout(60)
def test_64_mib_messages_both_ways(pair: Any) -> None:
    primary, worker = pair("json", max_message=65 * MIB)
    down = "d" * (64 * MIB)
    up = "u" * (64 * MIB)
    stop = threading.Event()
    results: dict[str, Any] = {}

    def worker_side() -> None:
        sender = threading.Thread(target=worker.send_message, args=({"up": up},))
        sender.start()
        got: list[Any] = []
        while not got:
            got = worker.read_messages()
        results["worker"] = got
        sender.join(30)

    t = threading.Thread(target=worker_side)
    t.start()
    assert primary.send_message({"down": down}) is False  # backed up: the rest is queued
    assert primary.has_backlog()
    flusher = threading.Thread(target=pump, args=(primary, stop))
    flusher.start()
    got = read_n(primary, 1, timeout=40)
    t.join(40)
    stop.set()
    flusher.join(10)
    assert len(got) == 1 and got[0][1]["up"] == up
    [(kind, message, fds)] = results["worker"]
    assert kind == KIND_JSON and message["down"] == down and fds == []
    # the reader gave its big buffer back and keeps working
    worker.send_message("after")
    assert read_n(primary, 1)[0][1] == "after"


@pytest.mark.parametrize("serialization", ["json", "pickle"])
def test_unserializable_message_raises_type_error_and_channel_lives(pair: Any, serialization: str) -> None:
    primary, worker = pair(serialization)
    circular: list[Any] = []
    circular.append(circular)
    bad: list[Any] = [lambda: 1, threading.Lock(), (i for i in range(3))]
    if serialization == "json":
        bad += [object(), {1, 2}, circular, "\ud800", b"bytes"]
    for message in bad:
        with pytest.raises(TypeError):
            primary.send_message(message)
        with pytest.raises(TypeError):
            worker.send_message(message)
    assert not primary.closed and not worker.closed
    assert primary.send_message({"ok": 1}) is True
    assert worker.send_message({"ok": 2}) is True
    assert read_n(worker, 1)[0][1] == {"ok": 1}
    assert read_n(primary, 1)[0][1] == {"ok": 2}


def test_user_messages_that_look_internal_stay_user_messages(pair: Any) -> None:
    primary, worker = pair()
    lookalikes = [{"t": "online"}, ["c", 1], {"cmd": "NODE_x"}, {"t": "disconnect"}, ["a", 1, 1]]
    for m in lookalikes:
        primary.send_message(m)
    primary.send_internal({"t": "online"})
    got = read_n(worker, len(lookalikes) + 1)
    assert [(k, m) for k, m, _ in got[:-1]] == [(KIND_JSON, m) for m in lookalikes]
    assert got[-1][:2] == (KIND_INTERNAL, {"t": "online"})


# -- descriptors -------------------------------------------------------------------------------------

def test_passed_socket_arrives_usable_and_close_on_exec(pair: Any) -> None:
    primary, worker = pair()
    mine, theirs = socket.socketpair()
    try:
        assert primary.send_message({"take": "this"}, [theirs.fileno()]) is True
        theirs.close()  # the receiver's copy is a new descriptor
        [(kind, message, fds)] = read_n(worker, 1)
        assert kind == KIND_JSON and message == {"take": "this"} and len(fds) == 1
        assert fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        got = socket.socket(fileno=fds[0])
        with got:
            got.sendall(b"through the passed socket")
            assert mine.recv(100) == b"through the passed socket"
            mine.sendall(b"back")
            assert got.recv(100) == b"back"
    finally:
        mine.close()


def test_many_fds_in_one_frame_and_fds_stay_with_their_frames(pair: Any) -> None:
    primary, worker = pair()
    pipes = [os.pipe() for _ in range(MAX_FDS + 1)]
    try:
        writers = [w for _, w in pipes]
        with pytest.raises(ValueError):
            worker.send_message("too many", writers)
        worker.send_message("many", writers[:MAX_FDS])
        worker.send_message("none")
        worker.send_internal(["one"], writers[MAX_FDS:])
        worker.send_message("two", writers[:2])
        got = read_n(primary, 4)
        expected = [("many", MAX_FDS), ("none", 0), (["one"], 1), ("two", 2)]
        assert [(m, len(fds)) for _, m, fds in got] == expected
        received = got[0][2] + got[2][2]
        assert len(set(received)) == MAX_FDS + 1
        for i, fd in enumerate(received):  # each one is the right pipe, and close-on-exec
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            os.write(fd, bytes([i % 256]))
            assert os.read(pipes[i][0], 1) == bytes([i % 256])
            os.close(fd)
        for fd in got[3][2]:
            os.close(fd)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_queued_frames_with_fds_keep_them(pair: Any) -> None:
    """Coalesced flushes carry the descriptors of every queued frame to the right frame."""
    primary, worker = pair()
    fill = "f" * 50000
    while not primary.has_backlog():
        primary.send_message(["fill", fill])
    pipes = [os.pipe() for _ in range(300)]
    try:
        for i, (_, w) in enumerate(pipes):
            primary.send_message(["fd", i], [w] if i % 3 else [])
            if i % 50 == 0:
                primary.send_message(["fds", i], [pipes[j][1] for j in range(i, i + 3)])
        stop = threading.Event()
        flusher = threading.Thread(target=pump, args=(primary, stop))
        flusher.start()
        got: list[Any] = []
        deadline = time.monotonic() + 20
        while not got or got[-1][1] != ["fd", 299]:
            assert time.monotonic() < deadline
            got.extend(worker.read_messages())
        stop.set()
        flusher.join(10)
        for _, m, fds in got:
            if m[0] == "fill":
                assert fds == []
            elif m[0] == "fd":
                i = m[1]
                assert len(fds) == (1 if i % 3 else 0)
                for fd in fds:
                    os.write(fd, b"x")
                    assert os.read(pipes[i][0], 1) == b"x"
                    os.close(fd)
            else:
                i = m[1]
                assert len(fds) == 3
                for j, fd in enumerate(fds):
                    os.write(fd, b"y")
                    assert os.read(pipes[i + j][0], 1) == b"y"
                    os.close(fd)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_lost_descriptors_are_detected(pair: Any) -> None:
    """MSG_CTRUNC: an ancillary buffer too small for what came. The kernel caps one sendmsg at
    SCM_MAX_FD and stops a read after one message with descriptors, so the channel's own buffer
    always fits; a receiver built with room for one descriptor shows the check works."""
    primary, worker = pair(anc_size=socket.CMSG_SPACE(4))
    before = set(os.listdir("/proc/self/fd"))
    rs, ws = zip(*[os.pipe() for _ in range(3)], strict=True)
    try:
        primary.send_message("three fds", list(ws))
        with pytest.raises(ProtocolError, match="MSG_CTRUNC"):
            worker.read_messages()
        with pytest.raises(ProtocolError):  # the channel stays failed
            worker.read_messages()
        worker.close()  # closes the descriptor that did arrive
    finally:
        for fd in rs + ws:
            os.close(fd)
    assert set(os.listdir("/proc/self/fd")) <= before  # nothing leaked


# -- bad peers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("garbage", [
    b"\xff" * 64,  # a header with an impossible kind
    HEADER.pack(5, KIND_JSON, 0, 3) + b"hello",  # claims descriptors that never came
    HEADER.pack(5, KIND_JSON, 7, 0) + b"hello",  # unknown flags
    HEADER.pack(5, KIND_JSON, 0, 0) + b"{{{{{",  # not JSON
    HEADER.pack(2, KIND_INTERNAL, 0, 0) + b"\xc3\x28",  # not UTF-8
    HEADER.pack(4, KIND_PICKLE, 0, 0) + b"junk",  # not a pickle (on a pickle channel)
])
def test_garbage_from_the_peer_raises_protocol_error(pair: Any, garbage: bytes) -> None:
    primary, worker = pair("pickle" if garbage[4] == KIND_PICKLE else "json")
    worker.sock.sendall(garbage)
    with pytest.raises(ProtocolError):
        read_n(primary, 1)


def test_good_frames_before_garbage_are_delivered_first(pair: Any) -> None:
    primary, worker = pair()
    worker.send_message({"good": 1})
    worker.send_message({"good": 2})
    worker.sock.sendall(HEADER.pack(3, KIND_JSON, 0, 0) + b"}}}")
    time.sleep(0.05)
    got = read_n(primary, 2)
    assert [m for _, m, _ in got] == [{"good": 1}, {"good": 2}]
    with pytest.raises(ProtocolError):
        primary.read_messages()


def test_eof_raises_channel_closed_and_sends_fail(pair: Any) -> None:
    primary, worker = pair()
    worker.shutdown()
    with pytest.raises(ChannelClosed):
        read_n(primary, 1)
    assert worker.send_message("late") is False
    primary.close()
    assert primary.send_message("late") is False


# -- queued writes on the non-blocking end -------------------------------------------------------

def test_queued_writes_flush_in_order_and_call_back_once_after_the_write() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ch = Channel(a, "json")
    received = bytearray()
    calls: list[int] = []
    errors: list[str] = []

    def count_frames(data: bytes | bytearray) -> int:
        pos, count = 0, 0
        while len(data) - pos >= HEADER.size:
            length = HEADER.unpack_from(data, pos)[0]
            if len(data) - pos - HEADER.size < length:
                break
            pos += HEADER.size + length
            count += 1
        return count

    def drain() -> None:
        """Take what the peer can read now."""
        while True:
            try:
                chunk = b.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            received.extend(chunk)

    def written() -> int:
        """Frames written so far: those taken plus those waiting in the socket (peeked, kept)."""
        try:
            waiting = b.recv(1 << 21, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except BlockingIOError:
            waiting = b""
        return count_frames(received + waiting)

    def callback_for(i: int) -> Any:
        def cb() -> None:
            seen = written()
            if seen < i + 1:
                errors.append(f"callback {i} ran before its frame was written ({seen} seen)")
            calls.append(i)
            if i == 5:  # a callback may send (it runs outside the channel's lock)
                ch.send_message(["from callback"])
        return cb

    try:
        n = 3000
        payload = "z" * 3000
        sent = [ch.send_message([i, payload], (), callback_for(i)) for i in range(n)]
        backed_up = sent.index(False)  # past HIGH_WATER queued bytes (yet queued)
        assert backed_up > 0 and all(sent[:backed_up]) and not any(sent[backed_up:])
        assert ch.has_backlog()
        assert len(calls) < n
        deadline = time.monotonic() + 20
        while ch.has_backlog():
            assert time.monotonic() < deadline
            drain()
            ch.flush()
        drain()
        assert errors == []
        assert calls == list(range(n))  # once each, in order
        frames, pos = [], 0
        while pos < len(received):
            length, kind, _, _ = HEADER.unpack_from(received, pos)
            frames.append(bytes(received[pos + HEADER.size: pos + HEADER.size + length]))
            pos += HEADER.size + length
        decoded = [json.loads(f) for f in frames]
        data = [m for m in decoded if m != ["from callback"]]
        assert [m[0] for m in data] == list(range(n))
        assert decoded.count(["from callback"]) == 1
    finally:
        ch.close()
        b.close()


def test_flush_after_the_peer_is_gone_drops_the_queue(pair: Any) -> None:
    primary, worker = pair()
    calls: list[int] = []
    while not primary.has_backlog():
        primary.send_message("x" * 100000, (), lambda: calls.append(1))
    before = len(calls)
    primary.send_message("queued", (), lambda: calls.append(2))
    worker.close()
    for _ in range(5):
        primary.flush()
    assert primary.closed and not primary.has_backlog()
    assert 2 not in calls and len(calls) == before
    assert primary.send_message("after") is False


def test_header_layout_is_stable() -> None:
    """8 bytes: payload length, kind, flags, descriptor count (little-endian)."""
    assert HEADER.size == 8
    assert HEADER.pack(1, 2, 0, 3) == struct.pack("<IBBH", 1, 2, 0, 3)


def test_bursts_are_queued_and_written_together_in_order(pair: Any) -> None:
    """With a loop attached (on_backlog), back-to-back sends are queued and go out in batches:
    the sender flushes long bursts itself, the loop the rest; order and callbacks are kept."""
    primary, worker = pair()
    wakeups: list[int] = []
    primary.on_backlog = lambda: wakeups.append(len(primary._out))
    calls: list[int] = []
    n = 5000
    for i in range(n):
        assert primary.send_message({"i": i}, (), lambda i=i: calls.append(i)) is True
    # what the loop does when it wakes up for on_backlog
    stop = threading.Event()
    flusher = threading.Thread(target=pump, args=(primary, stop))
    flusher.start()
    got: list[Any] = []
    while len(got) < n:
        got.extend(worker.read_messages())
    stop.set()
    flusher.join(10)
    assert [m["i"] for _, m, _ in got] == list(range(n))
    assert calls == list(range(n))
    assert wakeups and len(wakeups) < n / 10  # queued, not one wake-up per message
    assert not primary.has_backlog()


@pytest.mark.parametrize("text", [
    "x" * 70000,  # long ASCII: the fast path
    'quote " inside' * 1000,  # long, but must be escaped
    "new\nline" * 1000,
    "é✓😀" * 3000,  # long, not ASCII
    "y" * 5000 + "\x01",
])
def test_long_strings_after_a_big_message_encode_the_same(pair: Any, text: str) -> None:
    primary, worker = pair()
    def send() -> None:
        worker.send_message({"warm-up": "w" * 100000})  # the next one uses the long-string encoder
        worker.send_message({"s": text, "list": [text, 1]})

    t = threading.Thread(target=send)
    t.start()
    got = read_n(primary, 2)
    t.join(10)
    assert got[1][1] == {"s": text, "list": [text, 1]}


@pytest.mark.parametrize("message", [
    {"k" * 5000: "v" * 5000, "short": "s"},  # a long key
    ["z" * 4100] * 40,  # more long strings than go as separate buffers
    {"a": ["x" * 9000, {"b": "y" * 9000, "n": [1, 2.5, None, True]}], "c": "\u0000short"},  # a NUL, escaped
    {"t": "tab\tin a long one " * 400},  # a control character in a long string
    {"u": "é" * 8000, "q": 'a "quoted" one' * 10},
    "w" * 20000,  # a bare long string
])
def test_big_messages_with_long_strings_decode_the_same(pair: Any, message: Any) -> None:
    primary, worker = pair()

    def send() -> None:
        worker.send_message({"warm-up": "w" * 100000})
        worker.send_message(message)

    t = threading.Thread(target=send)
    t.start()
    got = read_n(primary, 2)
    t.join(10)
    assert got[1][1] == message
