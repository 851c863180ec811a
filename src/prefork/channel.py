"""The IPC channel between the primary and one worker: framing, serializers and fd passing.

One stream socketpair per worker. Every frame is an 8-byte header (payload length, kind, flags, fd
count) then the payload. The kind byte keeps internal messages apart from user messages, so no user
message is ever mistaken for an internal one whatever its keys (Node's `cmd: 'NODE_...'` gotcha).
Descriptors ride as SCM_RIGHTS on a sendmsg that carries the frame's first byte or an earlier one,
so they never arrive after their header; the reader keeps them in a FIFO and hands each frame its own.

The primary's end is non-blocking: a write that would block is queued and flushed by the primary's
loop, so a slow worker never stalls it. A worker's end blocks on writes, which is natural back-pressure.

Speed matters here (every message of every worker goes through it):
- reads go into one reused buffer (`recvmsg_into`: `recvmsg(256 KiB)` allocates and frees that
  much per call, ~9 us against ~1 us here), and a batch of frames is decoded in one pass with
  the C JSON scanner and encoder built once;
- on the primary's end, a send that follows another by less than BURST is queued instead of written,
  and the queue goes out with one sendmsg (by the sender once FLUSH_AT frames wait, else by the loop
  right after): a stream of small messages costs one syscall per batch, not per message. A send
  that answers something just read is written at once;
- after a process sent a user message, its reader polls for up to SPIN seconds before it sleeps (on
  the primary, Primary._on_readable does this for the worker's channel): on a VM a wake-up costs
  more than a whole round trip, and the answer usually comes within that. It yields the CPU between
  polls, so it only uses idle time. PREFORK_IPC_SPIN_US sets it (0 turns it off).
- a JSON message after a big one is encoded with a string encoder that copies long ASCII strings
  needing no escape instead of escaping them character by character.
"""

from __future__ import annotations

import array
import collections
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

HEADER = struct.Struct("<IBBH")
HEADER_SIZE = HEADER.size
KIND_JSON, KIND_PICKLE, KIND_INTERNAL = 0, 1, 2
MAX_PAYLOAD = 1 << 30
MAX_FDS = 253  # SCM_MAX_FD
RECV_SIZE = 256 * 1024
SMALL = 16 * 1024  # payloads up to this size are copied next to their header: one buffer, one copy
FLUSH_BYTES = 1 << 20  # at most this much per coalesced sendmsg
FLUSH_FRAMES = 512  # and at most this many frames (IOV_MAX is 1024)
FLUSH_AT = 128  # a burst this many frames long is flushed by the sender itself
BIG = 32 * 1024  # a JSON message this big makes the next one use the long-string encoder
BURST = 20e-6  # a send this soon after the previous one is queued and written with the next ones
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * 4)
_SERIALIZERS = {"json": KIND_JSON, "pickle": KIND_PICKLE}
_KIND_NAMES = ("json", "pickle", "internal")
_pack = HEADER.pack
_yield = os.sched_yield
_monotonic = time.monotonic
_unpack_from = HEADER.unpack_from
_SOL_SOCKET, _SCM_RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS
_CLOEXEC, _DONTWAIT, _CTRUNC = socket.MSG_CMSG_CLOEXEC, socket.MSG_DONTWAIT, socket.MSG_CTRUNC

_json_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_json_decode = json.JSONDecoder().decode
try:  # the C encoder and scanner, built once (json.dumps/loads rebuild or wrap them every call)
    from _json import make_encoder as _make_encoder
    from _json import make_scanner as _make_scanner

    _c_encode_basestring = json.encoder.encode_basestring
    _c_encode = _make_encoder(None, json.JSONEncoder().default, _c_encode_basestring, None,
                              ":", ",", False, False, True)
    # the same, but strings go through _encode_str: for channels whose messages are big
    _c_encode_big = _make_encoder(None, json.JSONEncoder().default, lambda s: _encode_str(s), None,
                                  ":", ",", False, False, True)
    _scan = _make_scanner(json.JSONDecoder())
except ImportError:  # pragma: no cover - CPython always has _json
    _c_encode = _c_encode_big = None
    _scan = None

#: Seconds a reader keeps polling after its side sent a user message (see the module's docstring).
SPIN = float(os.environ.get("PREFORK_IPC_SPIN_US", "50")) / 1e6


class ChannelClosed(Exception):
    """The peer closed the channel (EOF) or it was closed here."""


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame: the channel cannot be trusted any more."""


def serialization_kind(name: str) -> int:
    try:
        return _SERIALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown serialization {name!r}: use 'json' or 'pickle'") from None


def _dumps_json(message: Any) -> bytes:
    if _c_encode is None:  # pragma: no cover
        return _json_encode(message).encode()
    chunks = _c_encode(message, 0)
    return (chunks[0] if len(chunks) == 1 else "".join(chunks)).encode()


_SPECIAL = bytes(0 if i < 0x20 or i in (0x22, 0x5C) else 1 for i in range(256))  # what JSON escapes


def _encode_str(s: str) -> str:
    """A JSON string, as json's C encoder writes it, faster for long ASCII strings that need no
    escape (the C encoder looks at each character: ~80 us for 64 KiB, this ~25 us)."""
    if len(s) >= 4096 and s.isascii() and 0 not in s.encode().translate(_SPECIAL):
        return '"' + s + '"'
    return _c_encode_basestring(s)


def _dumps_json_big(message: Any) -> bytes:
    chunks = _c_encode_big(message, 0)
    return (chunks[0] if len(chunks) == 1 else "".join(chunks)).encode()


def _dumps_pickle(message: Any) -> bytes:
    import pickle

    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def encode(message: Any, kind: int) -> bytes:
    """Serialize a user or internal message; anything that cannot be sent raises TypeError."""
    try:
        return _dumps_pickle(message) if kind == KIND_PICKLE else _dumps_json(message)
    except TypeError:
        raise
    except (ValueError, AttributeError, RecursionError) as exc:
        raise TypeError(f"message cannot be serialized: {exc}") from exc
    except Exception as exc:  # pickle.PicklingError and whatever a __reduce__ raises
        raise TypeError(f"message cannot be serialized: {exc!r}") from exc


def decode(kind: int, payload: bytes | bytearray | memoryview) -> Any:
    try:
        if kind == KIND_PICKLE:
            import pickle

            return pickle.loads(payload)
        return _json_decode(str(payload, "utf-8"))
    except Exception as exc:
        raise ProtocolError(f"undecodable {_KIND_NAMES[kind]} frame: {exc}") from exc


class Channel:
    """Frames over one end of a socketpair; `send` may be called from any thread."""

    def __init__(self, sock: socket.socket, serialization: str = "json", blocking: bool = False,
                 anc_size: int = _ANC_SIZE) -> None:
        self.sock = sock
        self.kind = serialization_kind(serialization)
        self._dumps = _dumps_pickle if self.kind == KIND_PICKLE else _dumps_json
        self._big = False  # the last user message was big: encode the next one with _encode_str
        self.blocking = blocking
        sock.setblocking(blocking)
        self._small = bytearray(RECV_SIZE)
        self._rbuf = self._small
        self._rview = memoryview(self._rbuf)
        self._start = 0  # unparsed bytes are _rbuf[_start:_end]
        self._end = 0
        self._error: ProtocolError | None = None  # raised by the next read, after the good frames
        self._anc_size = anc_size  # tests shrink it to provoke MSG_CTRUNC
        self._fds: collections.deque[int] = collections.deque()
        self._wlock = threading.Lock()
        self._out: collections.deque[list[Any]] = collections.deque()
        self.closed = False
        self.on_backlog: Callable[[], None] | None = None  # the loop watches for writability
        self._last_write = 0.0  # when the last direct write was made (bursts are queued instead)
        self._blocked = False  # the last write found the socket full: the loop waits for writable
        self.bytes_read = 0  # lets a caller see whether a read made progress
        self._sent_user = 0.0  # when this end last sent a user message (the reader may spin)
        self._send = sock.send
        self._sendmsg = sock.sendmsg
        self._recvmsg_into = sock.recvmsg_into

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def _buf(self) -> memoryview:
        """The bytes received and not yet framed (a partial frame)."""
        return self._rview[self._start:self._end]

    # -- writing ---------------------------------------------------------------------------------

    def send_message(self, message: Any, fds: tuple[int, ...] | list[int] = (),
                     callback: Callable[[], Any] | None = None) -> bool:
        """Send a user message; TypeError if it cannot be serialized (the channel stays usable)."""
        try:
            payload = (_dumps_json_big if self._big else self._dumps)(message)
        except TypeError:
            raise
        except Exception:
            payload = encode(message, self.kind)  # raises the TypeError that says why
        if self.kind == KIND_JSON:  # big messages tend to follow big ones: pick the encoder for that
            self._big = len(payload) >= BIG
        return self.send_frame(self.kind, payload, fds, callback, True)

    def send_internal(self, message: Any, fds: tuple[int, ...] | list[int] = ()) -> bool:
        return self.send_frame(KIND_INTERNAL, _dumps_json(message), fds, None)

    def send_frame(self, kind: int, payload: bytes, fds: tuple[int, ...] | list[int] = (),
                   callback: Callable[[], Any] | None = None, user: bool = False) -> bool:
        """Write one frame, or queue what would block. False if the channel is closed."""
        size = len(payload)
        if size > MAX_PAYLOAD:
            raise TypeError(f"message of {size} bytes exceeds the {MAX_PAYLOAD}-byte limit")
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
                self._write_all(header, payload, fds)
            else:
                out = self._out
                if out or (now - self._last_write < BURST and self.on_backlog is not None):
                    # Part of a burst: queue it, so that one sendmsg writes many frames. The loop
                    # flushes the queue soon (on_backlog); a long burst flushes itself as it goes.
                    out.append([header + payload if size <= SMALL else memoryview(header + payload),
                                fds, callback])
                    self._last_write = now
                    if len(out) == 1:
                        self.on_backlog()  # type: ignore[misc]
                    elif len(out) >= FLUSH_AT and not self._blocked:
                        flush = True
                    callback = None
                else:
                    self._last_write = now
                    if not self._try_write(header, payload, fds, callback):
                        return not self.closed
        if flush:
            self.flush()
        elif callback is not None:
            callback()
        return True

    def _try_write(self, header: bytes, payload: bytes, fds: Any, callback: Any) -> bool:
        """Write at once if the socket takes it all; else queue the rest. True when fully written."""
        small = len(payload) <= SMALL
        data = header + payload if small else None
        try:
            if fds:
                anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))]
                sent = self._sendmsg([data] if small else [header, payload], anc)
            elif small:
                sent = self._send(data)
            else:
                sent = self._sendmsg([header, payload])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fail(exc)
            return False
        total = HEADER_SIZE + len(payload)
        if sent == total:
            return True
        rest = memoryview(data if small else header + payload)[sent:]
        self._out.append([rest, fds if sent == 0 else (), callback])
        self._blocked = True
        if self.on_backlog is not None:
            self.on_backlog()
        return False

    def _write_all(self, header: bytes, payload: bytes, fds: Any) -> None:
        small = len(payload) <= SMALL
        try:
            if fds:
                anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))]
                data = memoryview(header + payload)
                sent = self._sendmsg([data], anc)
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            elif small:
                self.sock.sendall(header + payload)
            else:
                sent = self._sendmsg([header, payload])
                if sent < HEADER_SIZE + len(payload):
                    self.sock.sendall(memoryview(header + payload)[sent:])
        except OSError as exc:
            self._fail(exc)
            raise ChannelClosed(str(exc)) from exc

    def has_backlog(self) -> bool:
        return bool(self._out)

    def flush(self) -> bool:
        """Write queued frames (the loop calls this when writable); True once nothing is left.

        Many frames go out with one sendmsg. Descriptors ride on it with the first byte it sends,
        which comes no later than their frame's header; after a partial write they count as sent.
        """
        done: list[Callable[[], Any]] = []
        out = self._out
        with self._wlock:
            while out:
                bufs: list[Any] = []
                fds: list[int] = []
                size = 0
                for item in out:
                    if item[1]:
                        if len(fds) + len(item[1]) > MAX_FDS:
                            break
                        fds.extend(item[1])
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
                except OSError as exc:
                    self._fail(exc)
                    break
                if sent >= size:  # the common case: the whole batch went
                    for _ in range(len(bufs)):
                        callback = out.popleft()[2]
                        if callback is not None:
                            done.append(callback)
                    continue
                for i in range(len(bufs)):
                    item = out[0]
                    n = len(item[0])
                    if sent >= n:
                        sent -= n
                        out.popleft()
                        if item[2] is not None:
                            done.append(item[2])
                        continue
                    if sent:
                        item[0] = memoryview(item[0])[sent:]
                    for j in range(len(bufs) - i):  # their descriptors went with this sendmsg
                        out[j][1] = ()
                    break
                self._blocked = True
                break  # the socket is full: wait until it is writable again
            empty = not out
            if empty:
                self._blocked = False
        for callback in done:
            callback()
        return empty

    # -- reading ---------------------------------------------------------------------------------

    def read(self) -> list[tuple[int, bytes, list[int]]]:
        """One recvmsg, then every whole frame it completed: [(kind, payload, fds)].

        Raises ChannelClosed on EOF and ProtocolError on garbage (after handing out the good
        frames before it). Non-blocking ends return [] when nothing is waiting.
        """
        if self._error is not None or not self._recv(0):
            if self._error is not None:
                raise self._error
            return []
        return self._parse(False)  # type: ignore[return-value]

    def read_messages(self) -> list[tuple[int, Any, list[int]]]:
        """As read(), but the payloads are decoded: [(kind, message, fds)].

        A blocking end that sent a user message less than SPIN seconds ago polls until then before
        it sleeps in recvmsg: the reply to a request usually comes within that, and catching it
        awake saves the wake-up, which costs more than the whole round trip on a VM.
        """
        if self._error is not None:
            raise self._error
        if not self.blocking:
            if not self._recv(0):
                return []
        elif self._sent_user:
            deadline = self._sent_user + SPIN
            recv = self._recv
            while not recv(_DONTWAIT):
                if time.monotonic() >= deadline:
                    self._sent_user = 0.0
                    recv(0)
                    break
                _yield()  # lets whatever else wants this core run: the spin only uses idle time
        else:
            self._recv(0)
        return self._parse(True)

    def _recv(self, flags: int) -> bool:
        """One recvmsg_into the read buffer; False if nothing was waiting (non-blocking)."""
        end = self._end
        try:
            n, anc, mflags, _ = self._recvmsg_into([self._rview[end:]], self._anc_size,
                                                   _CLOEXEC | flags)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        if anc:
            self._take_fds(anc)
        if mflags & _CTRUNC:
            self._error = ProtocolError("descriptors were lost in transit (MSG_CTRUNC)")
            raise self._error
        if not n:
            raise ChannelClosed("peer closed the channel")
        self._end = end + n
        self.bytes_read += n
        self._last_write = 0.0  # a send that answers what came is no burst: it goes out at once
        return True

    def _take_fds(self, anc: list[tuple[int, int, bytes]]) -> None:
        for level, ctype, cdata in anc:
            if level == _SOL_SOCKET and ctype == _SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                self._fds.extend(fds)

    def _parse(self, decode_them: bool) -> list[tuple[int, Any, list[int]]]:
        """Every whole frame in the buffer; keep the partial one and make room for the rest of it."""
        buf, view = self._rbuf, self._rview
        pos, end = self._start, self._end
        frames: list[tuple[int, Any, list[int]]] = []
        append = frames.append
        fdq = self._fds
        scan = _scan
        error: ProtocolError | None = None
        while end - pos >= HEADER_SIZE:
            length, kind, flags, nfds = _unpack_from(buf, pos)
            if kind > KIND_INTERNAL or flags or length > MAX_PAYLOAD or nfds > len(fdq):
                error = ProtocolError(f"bad frame header (kind={kind}, flags={flags}, length={length}, "
                                      f"fds={nfds}, fds waiting={len(fdq)})")
                break
            body = pos + HEADER_SIZE
            stop = body + length
            if stop > end:
                break
            fds = [fdq.popleft() for _ in range(nfds)] if nfds else []
            if not decode_them:
                append((kind, bytes(view[body:stop]), fds))
            elif kind != KIND_PICKLE and scan is not None:
                try:
                    text = buf[body:stop].decode() if length <= SMALL else str(view[body:stop], "utf-8")
                    message, idx = scan(text, 0)
                    if idx != len(text):  # whitespace around it, or several values: the strict way
                        message = _json_decode(text)
                except Exception as exc:
                    error = ProtocolError(f"undecodable {_KIND_NAMES[kind]} frame: {exc}")
                    close_fds(fds)
                    break
                append((kind, message, fds))
            else:
                try:
                    message = decode(kind, view[body:stop])
                except ProtocolError as exc:
                    error = exc
                    close_fds(fds)
                    break
                append((kind, message, fds))
            pos = stop
        if error is not None:
            self._error = error
            self._start = self._end = 0
            if not frames:
                raise error
            return frames
        if pos == end:
            self._start = self._end = 0
            if buf is not self._small:  # a big frame is done: give its buffer back
                self._rbuf, self._rview = self._small, memoryview(self._small)
        else:
            self._start = pos
            self._make_room()
        return frames

    def _make_room(self) -> None:
        """Room for the rest of the partial frame: move it to the front, or into a bigger buffer."""
        buf, start, end = self._rbuf, self._start, self._end
        need = RECV_SIZE // 2
        if end - start >= HEADER_SIZE:
            need = HEADER_SIZE + _unpack_from(buf, start)[0]
        if need <= len(buf) - start and len(buf) - end >= 4096:
            return
        if need > len(buf):
            new = bytearray(need)
        elif start == 0:
            return
        else:
            new = buf  # compact in place (a same-size slice assignment is a memmove)
        new[: end - start] = bytes(self._rview[start:end])
        if new is not buf:
            self._rbuf, self._rview = new, memoryview(new)
        self._start, self._end = 0, end - start

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


def close_fds(fds: list[int]) -> None:
    """Close received descriptors nobody will use (errors ignored: they may be gone already)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
