"""Listening sockets as a plain server makes them, and how accept loops treat running out of
descriptors: a leaf module (nothing of prefork's imported), so the registry (handles.py), the
policies, servers.py and the servers' accept loops can all use it without importing each other."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
import struct
from typing import Any

# Listening sockets the primary inherited (systemd's socket activation, fd://N: activation.py), by
# address. Filled before the loop starts, then only read: a listen() on such an address serves a
# duplicate of the inherited socket instead of binding, so every sharing policy works unchanged and
# a handle that closes its copy (no worker left) leaves the inherited socket open for the next one.
_adopted: dict[tuple[Any, ...], socket.socket] = {}


def _key(family: int, addr: Any) -> tuple[Any, ...]:
    return (family, addr) if isinstance(addr, str) else (family, str(addr[0]), int(addr[1]))


def adopt(family: int, addr: Any, sock: socket.socket) -> None:
    """Serve `sock` (already listening) wherever a worker listens on `addr`."""
    _adopted[_key(family, addr)] = sock


# SO_REUSEPORT sockets a previous primary passed on a hot upgrade (upgrade.py), by address: a
# reuseport group is served from them first, so no queued connection is reset when the old one goes.
_slots: dict[tuple[Any, ...], list[socket.socket]] = {}


def adopt_slot(family: int, addr: Any, sock: socket.socket) -> None:
    _slots.setdefault(_key(family, addr), []).append(sock)


def adopted_slots(family: int, addr: Any) -> int:
    return len(_slots.get(_key(family, addr), ()))


def is_adopted(family: int, addr: Any) -> bool:
    return _key(family, addr) in _adopted or bool(_slots.get(_key(family, addr)))


_claimed: set[tuple[Any, ...]] = set()  # adopted addresses a handle serves


def close_unclaimed() -> list[str]:
    """Close the adopted sockets no handle serves (a hot upgrade whose new command line dropped an
    address: left open, it would queue connections nobody accepts); their addresses, for the log.
    The socket files of unix addresses stay: removing a file is never the listener's to do."""
    gone = []
    for table in (_adopted, _slots):
        for key in [k for k in table if k not in _claimed]:
            value = table.pop(key)
            for sock in value if isinstance(value, list) else [value]:
                sock.close()
            gone.append(key[1] if len(key) == 2 else f"{key[1]}:{key[2]}")
    return gone


def adopted_fds() -> set[int]:
    return {sock.fileno() for sock in _adopted.values()} | {s.fileno() for v in _slots.values() for s in v}


def forget_adopted() -> None:
    """In a worker forked from the primary: the inherited sockets are the primary's. Their fds were
    closed at the fork (forkstart.py) and the numbers may be reused, so detach, never close, them."""
    for sock in [*_adopted.values(), *(s for socks in _slots.values() for s in socks)]:
        sock.detach()
    _adopted.clear()
    _slots.clear()


def bind_socket(family: int, addr: Any, backlog: int, reuseport: bool = False) -> socket.socket:
    """A listening socket as a plain server would make it (OSError as a plain bind raises it)."""
    slots = _slots.get(_key(family, addr)) if _slots else None
    if slots or (_adopted and _key(family, addr) in _adopted):
        _claimed.add(_key(family, addr))
    if slots:  # the group's sockets of the previous primary: the first handle takes them one by one
        if reuseport:
            return slots.pop(0)
        copy = slots[0].dup()  # the policy changed on the upgrade: serve one of them
        copy.setblocking(False)
        return copy
    inherited = _adopted.get(_key(family, addr)) if _adopted else None
    if inherited is not None:
        if reuseport:  # the group would need one socket per worker, each bound by us
            raise OSError(errno.EADDRINUSE, "an inherited socket cannot join a SO_REUSEPORT group "
                                            "(use the policy rr, least_conn or none)")
        copy = inherited.dup()
        copy.setblocking(False)
        return copy
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(tuple(addr))
        else:
            _bind_unix(sock, addr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


SO_ATTACH_FILTER, SO_DETACH_FILTER = 26, 27  # include/uapi/asm-generic/socket.h; not in `socket`
# Classic BPF, run with the TCP header at offset 0 (tcp_filter): drop a SYN without ACK (a new
# connection), keep every other packet, so the handshakes already under way still complete.
_DROP_SYN = b"".join(struct.pack("HBBI", *op) for op in (
    (0x30, 0, 0, 13),  # ldb [13]: the flags byte
    (0x54, 0, 0, 0x12),  # and #(SYN|ACK)
    (0x15, 1, 0, 0x02),  # jeq #SYN: to "ret #0"
    (0x06, 0, 0, 0xFFFFFFFF),  # ret: keep the packet
    (0x06, 0, 0, 0),  # ret #0: drop it
))


def refuse_new(sock: socket.socket) -> bool:
    """Make the kernel stop starting connections on a TCP listener, leaving its accept queue as
    it is: a new client's SYN goes unanswered and is retried about a second later (refused then,
    once the socket is closed, or served by whoever listens anew). The queue can then be emptied
    and the socket closed with nothing left in it to reset (closing a listener resets the
    connections queued on it). The filter belongs to the socket, not to this descriptor: only for
    a socket no other process serves. True if attached."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.fileno() < 0:
        return False  # a unix socket's connect() never passes a filter
    program = ctypes.create_string_buffer(_DROP_SYN, len(_DROP_SYN))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,  # struct sock_fprog
                        struct.pack("HP", len(_DROP_SYN) // 8, ctypes.addressof(program)))
    except OSError:
        return False
    return True


def is_refusing(sock: socket.socket) -> bool:
    """Whether refuse_new's filter is on the socket (any process may have put it there)."""
    # SO_GET_FILTER (= SO_ATTACH_FILTER) takes the room it may fill as a count of 8-byte blocks but
    # copies 8 bytes a block: socket.getsockopt gives one length for both, so another program's
    # longer filter would overflow its buffer. libc's call, with the room for ours: a longer one
    # fails with EINVAL and is not ours anyway.
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.fileno() < 0:
        return False
    room = ctypes.create_string_buffer(len(_DROP_SYN))
    blocks = ctypes.c_uint32(len(_DROP_SYN) // 8)
    if _libc().getsockopt(sock.fileno(), socket.SOL_SOCKET, SO_ATTACH_FILTER, room, ctypes.byref(blocks)):
        return False
    return blocks.value == len(_DROP_SYN) // 8 and room.raw == _DROP_SYN


_LIBC: list[Any] = []


def _libc() -> Any:
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def accept_new(sock: socket.socket) -> None:
    """Undo refuse_new: the socket completes handshakes again."""
    if sock.fileno() >= 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        except OSError:  # none attached
            pass


def _bind_unix(sock: socket.socket, path: str) -> None:
    """Replace a stale socket file (a socket nobody answers on), never a live server's socket nor
    anything that is not a socket: connect() to a regular file is refused too, so refusal alone
    does not say the file is a stale socket."""
    try:
        sock.bind(path)
        return
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:  # removed meanwhile: the path is free now
        sock.bind(path)
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EADDRINUSE, f"{path} exists and is not a socket (left as it is)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        sock.bind(path)
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path}: another server is listening on this socket")


# An accept that fails for want of descriptors or memory leaves the connection queued, so the
# listener stays readable: retrying at once spins. Servers stop watching it this long, then resume
# (as asyncio's and uvicorn's accept loops do, with 1 s).
ACCEPT_RETRY_S = 0.5
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
