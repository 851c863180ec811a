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
- a JSON message after a big one is encoded with a string encoder that takes long strings needing
  no escape as they are (one scan, one UTF-8 copy) instead of escaping them character by character,
  and never copies them again: the frame goes out as a list of buffers (the JSON around each long
  string, then the string's bytes), written with one sendmsg, and what does not fit is queued as
  those same buffers (never joined into one);
- a big JSON payload made mostly of long strings is decoded without the scanner going over them
  character by character (see _loads_long).
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
    _default = json.JSONEncoder().default
    _c_encode = _make_encoder(None, _default, _c_encode_basestring, None, ":", ",", False, False, True)
    _scan = _make_scanner(json.JSONDecoder())
except ImportError:  # pragma: no cover - CPython always has _json
    _c_encode = None
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


# maps each byte JSON escapes in a string (controls, quote, backslash; UTF-8 or not) to another one
_ESCAPED = bytes(0x7F if i < 0x20 or i in (0x22, 0x5C) else i for i in range(256))
LONG = 4096  # a string this long that needs no escape is sent as its own buffer (see _dumps_json_big)
CHUNK = 64 * 1024  # _clean looks at long strings in slices this long
MAX_PARTS = 32  # more long strings than this in one message: they are joined into one payload


def _clean(b: bytes) -> bool:
    """Whether b holds no byte JSON escapes. `translate` gives back the very same object when it
    changes nothing; a long one is looked at in slices, as one translate of it would allocate a
    copy of it, and fresh big allocations cost page faults (~3x the scan itself for 16 MiB)."""
    n = len(b)
    if n <= CHUNK:
        return b.translate(_ESCAPED) is b
    for i in range(0, n, CHUNK):
        piece = b[i:i + CHUNK]
        if piece.translate(_ESCAPED) is not piece:
            return False
    return True


def _dumps_json_big(message: Any) -> bytes | list[bytes]:
    """A JSON payload as json's C encoder writes it, faster when it holds long strings.

    The C encoder looks at each character of a string (~1.5 ns each: 25 ms for 16 MiB) and the
    payload is then joined and encoded to UTF-8, copying it twice more. Here a long string that
    needs no escape costs one UTF-8 copy and one scan (_clean); the encoder writes a NUL in its
    place (a NUL cannot appear in the encoder's own output: it escapes it), and the payload is the
    list of pieces between them with the strings' bytes in between, for one sendmsg. A message
    with no such string gives bytes.
    """
    longs: list[bytes] = []

    def encode_str(s: str) -> str:
        if len(s) >= LONG:
            try:
                b = s.encode()
            except UnicodeEncodeError:  # a lone surrogate: the C encoder's path says why
                return _c_encode_basestring(s)
            if _clean(b):
                longs.append(b)
                return '"\0"'
        return _c_encode_basestring(s)

    chunks = _make_encoder(None, _default, encode_str, None, ":", ",", False, False, True)(message, 0)
    text = chunks[0] if len(chunks) == 1 else "".join(chunks)
    if not longs:
        return text.encode()
    pieces = text.split("\0")
    parts = [pieces[0].encode()]
    for b, piece in zip(longs, pieces[1:], strict=True):
        parts.append(b)
        parts.append(piece.encode())
    if len(longs) > MAX_PARTS:  # a few buffers per sendmsg (IOV_MAX is 1024), and few queue items
        return b"".join(parts)
    return parts


_NOT_LONG = object()  # what _loads_long returns for a payload it leaves to the scanner
MAX_QUOTES = 256  # _loads_long walks the quotes of a payload: it gives up on one with more


def _loads_long(buf: bytearray, view: memoryview, start: int, stop: int) -> Any:
    """The JSON payload buf[start:stop] decoded, faster when long strings make most of it; or
    _NOT_LONG when it has another shape (the caller then decodes it as usual).

    The scanner decodes the whole payload to a str, then looks at each character of it and copies
    each string out: for 16 MiB that is two fresh 16 MiB objects (page faults) and ~11 ms. In a
    payload without a backslash (no escapes) the quotes delimit the strings; a long one is checked
    for control characters (_clean) and decoded straight from the buffer, the scanner parses the
    rest with a placeholder "\\u0000<n>" in its place (no other string can hold a NUL: a raw one
    is invalid and an escaped one needs a backslash), and the placeholders are then filled in.
    """
    if buf.find(b"\\", start, stop) >= 0:
        return _NOT_LONG
    find = buf.find
    longs: list[tuple[int, int]] = []
    quotes = 0
    q = find(b'"', start, stop)
    while q >= 0:
        e = find(b'"', q + 1, stop)
        if e < 0 or quotes == MAX_QUOTES:  # unterminated (the scanner says why), or many strings
            return _NOT_LONG
        if e - q > LONG:
            longs.append((q + 1, e))
        quotes += 1
        q = find(b'"', e + 1, stop)
    if not longs:
        return _NOT_LONG
    rest = stop - start - sum(e - b for b, e in longs)
    if rest > 1024 + (stop - start) // 256:  # the walk over the rest would cost more than it saves
        return _NOT_LONG
    pieces: list[Any] = []
    strs: list[str] = []
    at = start
    try:
        for i, (b, e) in enumerate(longs):
            for j in range(b, e, CHUNK):
                if not _clean(bytes(view[j:min(j + CHUNK, e)])):
                    return _NOT_LONG  # a control character
            strs.append(str(view[b:e], "utf-8"))
            pieces.append(view[at:b])
            pieces.append(b"\\u0000%d" % i)
            at = e
        pieces.append(view[at:stop])
        text = b"".join(pieces).decode()
        message, idx = _scan(text, 0)
        if idx != len(text):
            message = _json_decode(text)
    except Exception:  # the usual way raises the error, with positions in the real payload
        return _NOT_LONG
    return _fill(message, strs)


def _fill(obj: Any, strs: list[str]) -> Any:
    """obj with each placeholder string (a NUL, then n) replaced by strs[n] (see _loads_long)."""
    t = type(obj)
    if t is str:
        return strs[int(obj[1:])] if obj[:1] == "\0" else obj
    if t is list:
        for i, v in enumerate(obj):
            if type(v) in _CONTAINERS or (type(v) is str and v[:1] == "\0"):
                obj[i] = _fill(v, strs)
        return obj
    if t is dict:
        if any(k[:1] == "\0" for k in obj):
            return {_fill(k, strs): _fill(v, strs) for k, v in obj.items()}
        for k, v in obj.items():
            if type(v) in _CONTAINERS or (type(v) is str and v[:1] == "\0"):
                obj[k] = _fill(v, strs)
    return obj


_CONTAINERS = (list, dict)
if _c_encode is None:  # pragma: no cover
    _dumps_json_big = _dumps_json  # noqa: F811


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
        big = self._big
        try:
            payload = (_dumps_json_big if big else self._dumps)(message)
        except TypeError:
            raise
        except Exception:
            payload = encode(message, self.kind)  # raises the TypeError that says why
        if big and type(payload) is list:  # long strings, in pieces: the next one likely has some too
            return self.send_frame(self.kind, payload, fds, callback, True)
        if self.kind == KIND_JSON:  # big messages tend to follow big ones: pick the encoder for that
            self._big = len(payload) >= BIG
        return self.send_frame(self.kind, payload, fds, callback, True)

    def send_internal(self, message: Any, fds: tuple[int, ...] | list[int] = ()) -> bool:
        return self.send_frame(KIND_INTERNAL, _dumps_json(message), fds, None)

    def send_frame(self, kind: int, payload: bytes | list[bytes], fds: tuple[int, ...] | list[int] = (),
                   callback: Callable[[], Any] | None = None, user: bool = False) -> bool:
        """Write one frame, or queue what would block. False if the channel is closed.

        The payload is bytes, or a list of buffers that are sent one after the other (a big
        message in pieces, see _dumps_json_big: they are written as they are, never joined).
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
                    self._last_write = now
                    if first:
                        self.on_backlog()  # type: ignore[misc]
                    elif len(out) >= FLUSH_AT and not self._blocked:
                        flush = True
                    callback = None
                else:
                    self._last_write = now
                    if not self._try_write(header, payload, parts, size, fds, callback):
                        return not self.closed
        if flush:
            self.flush()
        elif callback is not None:
            callback()
        return True

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
        except OSError as exc:
            self._fail(exc)
            return False
        if sent == HEADER_SIZE + size:
            return True
        if small:
            self._out.append([memoryview(data)[sent:], fds if sent == 0 else (), callback])
        else:  # what is left of the buffers, as they are
            self._queue(_skip(bufs, sent), fds if sent == 0 else (), callback)
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
        self._fds.extend(fds_in(anc))

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
                    if length < BIG or (message := _loads_long(buf, view, body, stop)) is _NOT_LONG:
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


def fds_in(anc: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS message of recvmsg's ancillary data carries."""
    fds = array.array("i")
    for level, ctype, cdata in anc:
        if level == _SOL_SOCKET and ctype == _SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    return list(fds)


def close_fds(fds: list[int]) -> None:
    """Close received descriptors nobody will use (errors ignored: they may be gone already)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
