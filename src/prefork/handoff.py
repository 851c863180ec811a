"""The hand-off link: how round-robin connections travel from the primary to one worker's listener.

One SOCK_SEQPACKET socketpair per (worker, server), made by the worker when it listens. The primary
sends records of accepted descriptors (one byte per descriptor, the descriptors as SCM_RIGHTS); the
worker answers with small records: how many it took, how many it closed (for least_conn), and that
it closed its listener. Keeping this off the main channel lets the worker's serving loop receive
connections itself, in the thread that accepts them: no channel thread, no hand-over between
threads, no interpreter-lock round trip per connection.
"""

from __future__ import annotations

import array
import socket
import struct

MAX_FDS = 253  # SCM_MAX_FD
TOOK, FINISHED = b"a", b"d"
_COUNT = struct.Struct("<cI")
_ANC = socket.CMSG_SPACE(MAX_FDS * 4)
_RECV_FLAGS = socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC


class LinkError(OSError):
    """The peer sent what a link never carries (descriptors lost, or a record of unknown type)."""


def pair() -> tuple[socket.socket, socket.socket]:
    """(worker's end, primary's end), both close-on-exec."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_fds(sock: socket.socket, fds: list[int]) -> None:
    """One record carrying `fds` (at most MAX_FDS); BlockingIOError when the worker is full."""
    sock.sendmsg([b"c" * len(fds)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                 socket.MSG_DONTWAIT)


def recv_fds(sock: socket.socket) -> list[int] | None:
    """The descriptors of the next record ([] when none is waiting), None at end of stream."""
    data, anc, flags, _ = sock.recvmsg(MAX_FDS, _ANC, _RECV_FLAGS)
    fds = array.array("i")
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    if flags & socket.MSG_CTRUNC:
        raise LinkError("descriptors were lost in transit (MSG_CTRUNC)")
    if not data and not fds:
        return None
    return list(fds)


def send_count(sock: socket.socket, kind: bytes, count: int = 0) -> None:
    sock.send(_COUNT.pack(kind, count))


def recv_records(sock: socket.socket) -> tuple[list[tuple[bytes, int]], bool]:
    """Every record waiting from the worker as (kind, count), and whether its end has closed."""
    records: list[tuple[bytes, int]] = []
    while True:
        try:
            data = sock.recv(_COUNT.size, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return records, False
        if not data:
            return records, True
        if len(data) != _COUNT.size:
            raise LinkError(f"bad hand-off record {data!r}")
        records.append(_COUNT.unpack(data))
