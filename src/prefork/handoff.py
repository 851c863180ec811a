"""The hand-off link: how round-robin connections travel from the primary to one worker's listener.

One SOCK_SEQPACKET socketpair per (worker, server), made by the worker when it listens; it sends the
primary both ends. The primary sends one record per accepted connection (one byte, the descriptor as
SCM_RIGHTS) and closes its copy at once. It keeps a reference to the worker's end, so the records the
worker has not read stay in that end's queue whatever happens to the worker: when it dies or closes
its listener, the primary reads them back (`reclaim`) and hands them to another worker. The queue's
length (`waiting`, FIONREAD: one byte per connection) is the worker's window: no acknowledgement
travels back, so the primary wakes only for new connections. One descriptor per record, so that a
worker never holds more than the one it is taking; except for a listener whose server says it takes
every waiting connection at once (an event loop's accept callback: `Listener.set_eager`), which gets
one record per wake-up with all of its connections (one sendmsg, one wake-up of the worker). The
worker's records: counts of closed connections (least_conn), EAGER, and connections a closing
listener gives back.

Keeping this off the main channel lets the worker's serving loop receive connections itself, in the
thread that accepts them: no channel thread, no hand-over between threads.
"""

from __future__ import annotations

import array
import fcntl
import socket
import struct
import termios

from .channel import close_fds, fds_in

MAX_FDS = 253  # SCM_MAX_FD
FINISHED = b"d"  # n connections closed (least_conn)
EAGER = b"e"  # this listener's server takes every waiting connection at once: batch them
RETURNED = ord("r")  # a record of connections given back, one byte each (a closing listener's)
_COUNT = struct.Struct("<cI")
_ANC = socket.CMSG_SPACE(MAX_FDS * 4)
_RECV_FLAGS = socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
RECORD = [b"c"]  # a connection's record: this byte, its descriptor as SCM_RIGHTS (sent by the
#                  round-robin policy itself, on its hot path)


class LinkError(OSError):
    """The peer sent what a link never carries (a record of unknown type), or a record's
    descriptors were cut (MSG_CTRUNC: the receiver is out of descriptors); `lost` is then how many
    connections that record held, all dropped."""

    lost = 0


def pair() -> tuple[socket.socket, socket.socket]:
    """(worker's end, primary's end), both close-on-exec."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def recv_fds(sock: socket.socket) -> list[int] | None:
    """The descriptors of the next record ([] when none is waiting), None at end of stream;
    LinkError when the record arrived cut (its connections are closed, the link stays usable)."""
    data, fds = _receive(sock)
    return None if not data and not fds else fds


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One record's bytes and descriptors (non-blocking); LinkError if descriptors were lost."""
    data, anc, flags, _ = sock.recvmsg(MAX_FDS, _ANC, _RECV_FLAGS)
    fds = fds_in(anc)
    if flags & socket.MSG_CTRUNC:
        close_fds(fds)  # which of its connections arrived is unknown: drop the whole record
        exc = LinkError("descriptors were lost in transit (MSG_CTRUNC)")
        exc.lost = len(data)  # one byte per connection
        raise exc
    return data, fds


def reclaim(worker_end: socket.socket) -> list[int]:
    """Every descriptor still waiting in the worker's end, in order (the primary's copy of it)."""
    out: list[int] = []
    while True:
        try:
            fds = recv_fds(worker_end)
        except (BlockingIOError, InterruptedError):
            return out
        except LinkError:
            continue
        if not fds:
            return out
        out += fds


def waiting(worker_end: socket.socket) -> int:
    """How many connections wait in the link, not yet read by the worker (one byte each)."""
    buf = array.array("i", [0])
    fcntl.ioctl(worker_end.fileno(), termios.FIONREAD, buf)
    return buf[0]


def send_count(sock: socket.socket, kind: bytes, count: int = 0) -> None:
    sock.send(_COUNT.pack(kind, count))


def send_back(sock: socket.socket, fds: list[int]) -> None:
    """Give connections back to the primary (a closing listener held them, not yet taken)."""
    for start in range(0, len(fds), MAX_FDS):
        part = fds[start:start + MAX_FDS]
        sock.sendmsg([bytes([RETURNED]) * len(part)],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", part))])


def recv_records(sock: socket.socket) -> tuple[list[tuple[bytes, int]], list[int], bool]:
    """Every record waiting from the worker: (kind, count) reports, connections it gave back,
    and whether its end has closed."""
    records: list[tuple[bytes, int]] = []
    returned: list[int] = []
    while True:
        try:
            data, fds = _receive(sock)
        except (BlockingIOError, InterruptedError):
            return records, returned, False
        returned += fds
        if not data and not fds:
            return records, returned, True
        if data[:1] == bytes([RETURNED]):
            continue
        if len(data) != _COUNT.size:
            raise LinkError(f"bad hand-off record {data!r}")
        records.append(_COUNT.unpack(data))
