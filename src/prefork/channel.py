"""The IPC channel between the primary and one worker: framing, serializers and fd passing.

One stream socketpair per worker. Every frame is an 8-byte header (payload length, kind, fd count)
then the payload. The kind byte keeps internal messages apart from user messages, so no user message
is ever mistaken for an internal one whatever its keys (Node's `cmd: 'NODE_...'` gotcha). Descriptors
ride as SCM_RIGHTS on the sendmsg that carries the frame's first byte, so they always arrive no later
than their header; the reader keeps them in a FIFO and hands each frame its own.

The primary's end is non-blocking: a write that would block is queued and flushed by the primary's
loop, so a slow worker never stalls it. A worker's end blocks on writes, which is natural back-pressure.
"""

from __future__ import annotations

import array
import collections
import json
import os
import pickle
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct("<IBBH")
HEADER_SIZE = HEADER.size
KIND_JSON, KIND_PICKLE, KIND_INTERNAL = 0, 1, 2
MAX_PAYLOAD = 1 << 30
MAX_FDS = 253  # SCM_MAX_FD
RECV_SIZE = 256 * 1024
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * 4)
_SERIALIZERS = {"json": KIND_JSON, "pickle": KIND_PICKLE}
_json_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_json_decode = json.JSONDecoder().decode


class ChannelClosed(Exception):
    """The peer closed the channel (EOF) or it was closed here."""


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame: the channel cannot be trusted any more."""


def serialization_kind(name: str) -> int:
    try:
        return _SERIALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown serialization {name!r}: use 'json' or 'pickle'") from None


def encode(message: Any, kind: int) -> bytes:
    """Serialize a user or internal message; anything that cannot be sent raises TypeError."""
    try:
        if kind == KIND_PICKLE:
            return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        return _json_encode(message).encode()
    except TypeError:
        raise
    except (ValueError, pickle.PicklingError, AttributeError, RecursionError) as exc:
        raise TypeError(f"message cannot be serialized: {exc}") from exc


def decode(kind: int, payload: bytes) -> Any:
    try:
        if kind == KIND_PICKLE:
            return pickle.loads(payload)
        return _json_decode(payload.decode())
    except Exception as exc:
        raise ProtocolError(f"undecodable {('json', 'pickle', 'internal')[kind]} frame: {exc}") from exc


class Channel:
    """Frames over one end of a socketpair; `send` may be called from any thread."""

    def __init__(self, sock: socket.socket, serialization: str = "json", blocking: bool = False) -> None:
        self.sock = sock
        self.kind = serialization_kind(serialization)
        self.blocking = blocking
        sock.setblocking(blocking)
        self._buf = bytearray()
        self._fds: collections.deque[int] = collections.deque()
        self._wlock = threading.Lock()
        self._out: collections.deque[list[Any]] = collections.deque()
        self.closed = False
        self.on_backlog: Callable[[], None] | None = None  # the loop watches for writability
        self._sendmsg = sock.sendmsg
        self._recvmsg = sock.recvmsg

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- writing ---------------------------------------------------------------------------------

    def send_message(self, message: Any, fds: tuple[int, ...] | list[int] = (),
                     callback: Callable[[], Any] | None = None) -> bool:
        """Send a user message; TypeError if it cannot be serialized (the channel stays usable)."""
        return self.send_frame(self.kind, encode(message, self.kind), fds, callback)

    def send_internal(self, message: Any, fds: tuple[int, ...] | list[int] = ()) -> bool:
        return self.send_frame(KIND_INTERNAL, _json_encode(message).encode(), fds, None)

    def send_frame(self, kind: int, payload: bytes, fds: tuple[int, ...] | list[int] = (),
                   callback: Callable[[], Any] | None = None) -> bool:
        """Write one frame, or queue what would block. False if the channel is closed."""
        if len(payload) > MAX_PAYLOAD:
            raise TypeError(f"message of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
        if len(fds) > MAX_FDS:
            raise ValueError(f"at most {MAX_FDS} descriptors per message")
        header = HEADER.pack(len(payload), kind, 0, len(fds))
        with self._wlock:
            if self.closed:
                return False
            if self.blocking:
                self._write_all(header, payload, fds)
            elif self._out:
                self._out.append([memoryview(header + payload), fds, callback])
                return True
            elif not self._try_write(header, payload, fds, callback):
                return not self.closed
        if callback is not None:
            callback()
        return True

    def _try_write(self, header: bytes, payload: bytes, fds: Any, callback: Any) -> bool:
        """Write at once if the socket takes it all; else queue the rest. True when fully written."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            sent = self._sendmsg([header, payload], anc) if payload else self._sendmsg([header], anc)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fail(exc)
            return False
        total = len(header) + len(payload)
        if sent == total:
            return True
        data = memoryview(header + payload)[sent:]
        self._out.append([data, fds if sent == 0 else (), callback])
        if self.on_backlog is not None:
            self.on_backlog()
        return False

    def _write_all(self, header: bytes, payload: bytes, fds: Any) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            sent = self._sendmsg([header, payload], anc) if payload else self._sendmsg([header], anc)
            total = len(header) + len(payload)
            if sent < total:
                self.sock.sendall(memoryview(header + payload)[sent:])
        except OSError as exc:
            self._fail(exc)
            raise ChannelClosed(str(exc)) from exc

    def has_backlog(self) -> bool:
        return bool(self._out)

    def flush(self) -> bool:
        """Write queued frames (the loop calls this when writable); True once nothing is left."""
        done: list[Callable[[], Any]] = []
        with self._wlock:
            while self._out:
                item = self._out[0]
                data, fds, callback = item
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                try:
                    sent = self._sendmsg([data], anc)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self._fail(exc)
                    break
                if sent < len(data):
                    item[0], item[1] = data[sent:], ()
                    break
                self._out.popleft()
                if callback is not None:
                    done.append(callback)
            empty = not self._out
        for callback in done:
            callback()
        return empty

    # -- reading ---------------------------------------------------------------------------------

    def read(self) -> list[tuple[int, bytes, list[int]]]:
        """One recvmsg, then every whole frame it completed: [(kind, payload, fds)].

        Raises ChannelClosed on EOF and ProtocolError on garbage. Non-blocking ends return []
        when nothing is waiting.
        """
        try:
            data, anc, flags, _ = self._recvmsg(RECV_SIZE, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        if anc:
            self._take_fds(anc)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("descriptors were lost in transit (MSG_CTRUNC)")
        if not data:
            raise ChannelClosed("peer closed the channel")
        buf = self._buf
        if buf:
            buf += data
            return self._frames(buf)
        return self._frames(data)

    def _take_fds(self, anc: list[tuple[int, int, bytes]]) -> None:
        for level, ctype, cdata in anc:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                self._fds.extend(fds)

    def _frames(self, data: bytes | bytearray) -> list[tuple[int, bytes, list[int]]]:
        frames = []
        pos, end_of_data = 0, len(data)
        unpack = HEADER.unpack_from
        while end_of_data - pos >= HEADER_SIZE:
            length, kind, _flags, nfds = unpack(data, pos)
            if kind > KIND_INTERNAL or length > MAX_PAYLOAD or nfds > len(self._fds):
                raise ProtocolError(f"bad frame header (kind={kind}, length={length}, fds={nfds})")
            end = pos + HEADER_SIZE + length
            if end > end_of_data:
                break
            fds = [self._fds.popleft() for _ in range(nfds)] if nfds else []
            frames.append((kind, bytes(data[pos + HEADER_SIZE:end]), fds))
            pos = end
        if data is self._buf:
            del self._buf[:pos]
        elif pos < end_of_data:
            self._buf = bytearray(data[pos:])
        return frames

    # -- closing ---------------------------------------------------------------------------------

    def _fail(self, exc: OSError) -> None:
        self.closed = True
        self._out.clear()

    def shutdown(self) -> None:
        """Signal EOF both ways; wakes a thread blocked reading this end (close() would not)."""
        with self._wlock:
            self.closed = True
            self._out.clear()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Close the socket and any received descriptors no frame claimed."""
        with self._wlock:
            self.closed = True
            self._out.clear()
        while self._fds:
            try:
                os.close(self._fds.popleft())
            except OSError:
                pass
        try:
            self.sock.close()
        except OSError:
            pass
