"""The writing half of the IPC channel (channel.py): frames written at once, or queued.

A frame with descriptors starts the sendmsg that carries them as SCM_RIGHTS, so they arrive with its
first byte: the reader relies on it to close descriptors no frame claims (Channel._drop_unclaimed).

The primary's end is non-blocking: a write that would block is queued and flushed by the primary's
loop, so a slow worker never stalls it; past HIGH_WATER queued bytes a send returns False (as Node's
`process.send` does when its channel is backed up), though the frame is queued all the same. A
worker's end blocks on writes, which is natural back-pressure.

On the primary's end, a send that follows another by less than BURST is queued instead of written,
and the queue goes out with one sendmsg (by the sender once FLUSH_AT frames wait, else by the loop
right after): a stream of small messages costs one syscall per batch, not per message. A send that
answers something just read is written at once. Big payloads are written as the list of buffers
codec.py makes, never joined into one.
"""

from __future__ import annotations

import array
import collections
import socket
import struct
import threading
import time
from collections.abc import Callable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

HEADER = struct.Struct("<IBBH")  # payload length, kind, flags, descriptor count
HEADER_SIZE = HEADER.size
MAX_FDS = 253  # SCM_MAX_FD
HIGH_WATER = 4 << 20  # queued bytes past which a send returns False (the frame is still queued)
SMALL = 16 * 1024  # payloads up to this size are copied next to their header: one buffer, one copy
FLUSH_BYTES = 1 << 20  # at most this much per coalesced sendmsg
FLUSH_FRAMES = 512  # and at most this many frames (IOV_MAX is 1024)
FLUSH_AT = 128  # a burst this many frames long is flushed by the sender itself
BURST = 20e-6  # a send this soon after the previous one is queued and written with the next ones
_pack = HEADER.pack
_monotonic = time.monotonic
_SOL_SOCKET, _SCM_RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS


class ChannelClosed(Exception):
    """The peer closed the channel (EOF) or it was closed here."""


class Outbox:
    """Writes frames to one end of a socketpair; `send_frame` may be called from any thread."""

    def __init__(self, sock: socket.socket, blocking: bool, max_message: int) -> None:
        self.sock = sock
        self.blocking = blocking
        self.max_message = max_message
        self.closed = False
        self.on_backlog: Callable[[], None] | None = None  # the loop watches for writability
        self._wlock = threading.Lock()
        self._out: collections.deque[list[Any]] = collections.deque()  # [buffer, fds, callback]
        self._queued = 0  # bytes in _out, counted as they are queued and written
        self._last_write = 0.0  # when the last direct write was made (bursts are queued instead)
        self._blocked = False  # the last write found the socket full: the loop waits for writable
        self._sent_user = 0.0  # when this end last sent a user message (the reader may spin)
        self._send = sock.send
        self._sendmsg = sock.sendmsg

    def flush_queued(self) -> None:
        """Write what sends queued (a burst) now, unless the socket is known to be full."""
        if self._out and not self._blocked:
            self.flush()

    def send_frame(self, kind: int, payload: bytes | list[bytes], fds: tuple[int, ...] | list[int] = (),
                   callback: Callable[[], Any] | None = None, user: bool = False) -> bool:
        """Write one frame, or queue what would block. False if the channel is closed or backed up.

        The payload is bytes, or a list of buffers that are sent one after the other (a big
        message in pieces, see codec._dumps_json_big: they are written as they are, never joined).
        """
        parts = None
        if type(payload) is list:
            size = sum(map(len, payload))
            if size <= SMALL:
                payload = b"".join(payload)
            else:
                parts = payload
        else:
            size = len(payload)
        if size > self.max_message:
            raise TypeError(f"message of {size} bytes exceeds the channel's limit of {self.max_message}"
                            " bytes (setup_primary(max_message_size=...))")
        nfds = len(fds)
        if nfds > MAX_FDS:
            raise ValueError(f"at most {MAX_FDS} descriptors per message")
        header = _pack(size, kind, 0, nfds)
        now = _monotonic()
        if user:
            self._sent_user = now
        flush = False
        with self._wlock:
            if self.closed:
                return False
            if self.blocking:
                self._write_all(header, payload, parts, size, fds)
            else:
                out = self._out
                if out or (now - self._last_write < BURST and self.on_backlog is not None):
                    # Part of a burst: queue it, so that one sendmsg writes many frames. The loop
                    # flushes the queue soon (on_backlog); a long burst flushes itself as it goes.
                    if size <= SMALL:
                        out.append([header + payload, fds, callback])
                        first = len(out) == 1
                    else:  # a big payload is queued as it is, after its header: no copy
                        first = not out
                        self._queue([header, *(parts or (payload,))], fds, callback)
                    self._queued += HEADER_SIZE + size
                    self._last_write = now
                    if first:
                        self.on_backlog()  # type: ignore[misc]
                    elif len(out) >= FLUSH_AT and not self._blocked:
                        flush = True
                    callback = None
                else:
                    self._last_write = now
                    if not self._try_write(header, payload, parts, size, fds, callback):
                        return not self.closed and self._queued <= HIGH_WATER
        if flush:
            self.flush()
        elif callback is not None:
            callback()
        return self._queued <= HIGH_WATER

    def _queue(self, bufs: list[Any], fds: Any, callback: Any) -> None:
        """Queue one frame's buffers: its descriptors ride with the first, its callback with the last."""
        out = self._out
        last = len(bufs) - 1
        for i, buf in enumerate(bufs):
            out.append([buf, fds if i == 0 else (), callback if i == last else None])

    def _try_write(self, header: bytes, payload: bytes, parts: list[bytes] | None, size: int,
                   fds: Any, callback: Any) -> bool:
        """Write at once if the socket takes it all; else queue the rest. True when fully written."""
        small = size <= SMALL
        if small:
            data = header + payload
        else:
            bufs = [header, *parts] if parts else [header, payload]
        try:
            if fds:
                anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))]
                sent = self._sendmsg([data] if small else bufs, anc)
            elif small:
                sent = self._send(data)
            else:
                sent = self._sendmsg(bufs)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._fail()
            return False
        if sent == HEADER_SIZE + size:
            return True
        if small:
            self._out.append([memoryview(data)[sent:], fds if sent == 0 else (), callback])
        else:  # what is left of the buffers, as they are
            self._queue(_skip(bufs, sent), fds if sent == 0 else (), callback)
        self._queued += HEADER_SIZE + size - sent
        self._blocked = True
        if self.on_backlog is not None:
            self.on_backlog()
        return False

    def _write_all(self, header: bytes, payload: bytes, parts: list[bytes] | None, size: int,
                   fds: Any) -> None:
        small = size <= SMALL
        try:
            if small and not fds:
                self.sock.sendall(header + payload)
                return
            bufs = [header + payload] if small else [header, *parts] if parts else [header, payload]
            if fds:
                sent = self._sendmsg(bufs, [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))])
            else:
                sent = self._sendmsg(bufs)
            left = HEADER_SIZE + size - sent
            while left > 0:  # a blocking socket takes it all, unless a signal cut the write short
                bufs = _skip(bufs, sent)
                sent = self._sendmsg(bufs)
                left -= sent
        except OSError as exc:
            self._fail()
            raise ChannelClosed(str(exc)) from exc

    def flush(self) -> bool:
        """Write queued frames (the loop calls this when writable); True once nothing is left.

        Many frames go out with one sendmsg, but a frame with descriptors starts a sendmsg of its
        own: they arrive with its first byte, which lets the reader close descriptors no frame
        claims (_drop_unclaimed). After a partial write they count as sent.
        """
        done: list[Callable[[], Any]] = []
        out = self._out
        with self._wlock:
            while out:
                bufs: list[Any] = []
                fds: Any = ()
                size = 0
                for item in out:
                    if item[1]:
                        if bufs:
                            break
                        fds = item[1]
                    bufs.append(item[0])
                    size += len(item[0])
                    if size >= FLUSH_BYTES or len(bufs) >= FLUSH_FRAMES:
                        break
                try:
                    if fds:
                        sent = self._sendmsg(bufs, [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))])
                    else:
                        sent = self._sendmsg(bufs)
                except (BlockingIOError, InterruptedError):
                    self._blocked = True
                    break
                except OSError:
                    self._fail()
                    break
                self._queued -= sent
                if sent >= size:  # the common case: the whole batch went
                    for _ in range(len(bufs)):
                        callback = out.popleft()[2]
                        if callback is not None:
                            done.append(callback)
                    continue
                while True:
                    item = out[0]
                    n = len(item[0])
                    if sent < n:
                        break
                    sent -= n
                    out.popleft()
                    if item[2] is not None:
                        done.append(item[2])
                if sent:
                    item[0] = memoryview(item[0])[sent:]
                item[1] = ()  # the descriptors went with this sendmsg, which held only this frame's
                self._blocked = True
                break  # the socket is full: wait until it is writable again
            empty = not out
            if empty:
                self._blocked = False
        for callback in done:
            callback()
        return empty

    def has_backlog(self) -> bool:
        return bool(self._out)

    def _fail(self) -> None:
        """Closed: what is queued is dropped."""
        self.closed = True
        self._out.clear()
        self._queued = 0


def _skip(bufs: list[Any], n: int) -> list[Any]:
    """The buffers left once the first n bytes of bufs were written (a partial one as a view)."""
    i = 0
    while i < len(bufs) and n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if n:
        rest[0] = memoryview(rest[0])[n:]
    return rest
