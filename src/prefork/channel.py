"""The IPC channel between the primary and one worker: framing, fd passing and reading.

One stream socketpair per worker. Every frame is an 8-byte header (payload length, kind, flags, fd
count) then the payload, serialized by codec.py and written by outbox.py. The kind byte keeps
internal messages apart from user messages, so no user message is ever mistaken for an internal one
whatever its keys (Node's `cmd: 'NODE_...'` gotcha). A frame with descriptors starts the sendmsg
that carries them as SCM_RIGHTS, so they arrive with its first byte; the reader keeps them in a
FIFO, hands each frame its own, and closes at once those no frame can claim any more.

The peer is not trusted: a frame longer than max_message (the primary's `max_message_size`
setting; a worker gets it in PREFORK_MAX_MESSAGE), of another serialization than the channel's, or
claiming descriptors that did not come, is a ProtocolError, found from its header before anything
is allocated for it.

Speed matters here (every message of every worker goes through it):
- reads go into one reused buffer (`recvmsg_into`: `recvmsg(256 KiB)` allocates and frees that
  much per call, ~9 us against ~1 us here), and a batch of frames is decoded in one pass;
- writes are coalesced and never copy big payloads (see outbox.py);
- after a process sent a user message, its reader may poll for up to SPIN seconds before it sleeps
  (on the primary, Primary._on_readable asks `spin_deadline()`): on a VM a wake-up across CPUs
  costs more than a whole round trip, and the answer usually comes within that. It polls only when
  that can help (spin.py: the two processes' CPU placement and how often recent polls caught the
  answer), and yields the CPU between polls. PREFORK_IPC_SPIN_US sets it (0 turns it off).
"""

from __future__ import annotations

import array
import collections
import math
import os
import socket
import time
from collections.abc import Callable, Iterable

from ._errors import config_error
from .codec import (  # noqa: F401 - KIND_*, encode and decode are also imported from here
    _KIND_NAMES,
    _NOT_LONG,
    BIG,
    KIND_INTERNAL,
    KIND_JSON,
    KIND_PICKLE,
    ProtocolError,
    _dumps_json,
    _dumps_json_big,
    _dumps_pickle,
    _json_decode,
    _loads_long,
    _scan,
    decode,
    encode,
    serialization_kind,
)
from .outbox import HEADER, HEADER_SIZE, HIGH_WATER, MAX_FDS, SMALL, ChannelClosed, Outbox  # noqa: F401
from .spin import Spin, creator_of

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_PAYLOAD = 1 << 30  # the largest max_message allowed
MIN_MESSAGE = 64 * 1024  # the smallest: internal messages (a worker's traceback) must fit
DEFAULT_MAX_MESSAGE = 64 << 20  # room for bench/ipc.py's 16 MiB messages, and then some
RECV_SIZE = 256 * 1024
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * 4)
_yield = os.sched_yield
_monotonic = time.monotonic
_unpack_from = HEADER.unpack_from
_SOL_SOCKET, _SCM_RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS
_CLOEXEC, _DONTWAIT, _CTRUNC = socket.MSG_CMSG_CLOEXEC, socket.MSG_DONTWAIT, socket.MSG_CTRUNC


def _env_number(name: str, default: str, low: float, high: float) -> float:
    """A number from the environment; anything else ends the process with one line (exit 2)."""
    raw = os.environ.get(name, default)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # also nan
        config_error(f"{name}={raw!r}: expected a number from {low:g} to {high:g}")
    return value


#: Seconds a reader keeps polling after its side sent a user message (see the module's docstring).
SPIN = _env_number("PREFORK_IPC_SPIN_US", "50", 0, 1e6) / 1e6
# The frame size limit of channels made without one: in a worker, its primary's setting.
_max_message = int(_env_number("PREFORK_MAX_MESSAGE", str(DEFAULT_MAX_MESSAGE), MIN_MESSAGE, MAX_PAYLOAD))


def set_max_message(limit: int) -> None:
    """Set the limit of channels made from now on without one (settings.py: `max_message_size`)."""
    global _max_message
    _max_message = limit


class Channel(Outbox):
    """Frames over one end of a socketpair; `send_message` may be called from any thread."""

    def __init__(self, sock: socket.socket, serialization: str = "json", blocking: bool = False,
                 anc_size: int = _ANC_SIZE, max_message: int | None = None) -> None:
        super().__init__(sock, blocking, _max_message if max_message is None else max_message)
        self.kind = serialization_kind(serialization)
        self._dumps = _dumps_pickle if self.kind == KIND_PICKLE else _dumps_json
        self._big = False  # the last user message was big: encode the next one with _dumps_json_big
        sock.setblocking(blocking)
        self._small = bytearray(RECV_SIZE)
        self._rbuf = self._small
        self._rview = memoryview(self._rbuf)
        self._start = 0  # unparsed bytes are _rbuf[_start:_end]
        self._end = 0
        self.error: ProtocolError | None = None  # raised by the next read, after the good frames
        self._anc_size = anc_size  # tests shrink it to provoke MSG_CTRUNC
        self._fds: collections.deque[int] = collections.deque()
        self.bytes_read = 0  # lets a caller see whether a read made progress
        self._recvmsg_into = sock.recvmsg_into
        # whether the reader polls for an answer; a worker's peer is the primary (the primary sets .peer)
        self.spin = Spin(SPIN, creator_of(sock) if blocking else None)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def _buf(self) -> memoryview:
        """The bytes received and not yet framed (a partial frame)."""
        return self._rview[self._start:self._end]

    # -- the reader's spin (see the module's docstring) -------------------------------------------

    def spin_deadline(self) -> float:
        """Until when the reader should poll for the answer to the user message this end sent last
        (0.0: sleep at once). Asked once per message sent: it forgets the send."""
        sent = self._sent_user
        if not sent or self.closed:
            return 0.0
        self._sent_user = 0.0
        budget = self.spin.allowed(sent)
        return sent + budget if budget else 0.0

    # -- sending (outbox.py writes) ---------------------------------------------------------------

    def send_message(self, message: Any, fds: tuple[int, ...] | list[int] = (),
                     callback: Callable[[], Any] | None = None) -> bool:
        """Send a user message: False if the channel is closed, or backed up (then it is queued).

        TypeError if it cannot be serialized or is over max_message (the channel stays usable).
        """
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

    # -- reading ---------------------------------------------------------------------------------

    def read(self) -> list[tuple[int, bytes, list[int]]]:
        """One recvmsg, then every whole frame it completed: [(kind, payload, fds)].

        Raises ChannelClosed on EOF and ProtocolError on garbage (after handing out the good
        frames before it). Non-blocking ends return [] when nothing is waiting.
        """
        if self.error is not None or not self._recv(0):
            if self.error is not None:
                raise self.error
            return []
        return self._parse(False)  # type: ignore[return-value]

    def read_messages(self) -> list[tuple[int, Any, list[int]]]:
        """As read(), but the payloads are decoded: [(kind, message, fds)].

        A blocking end that sent a user message may poll until spin_deadline() before it sleeps in
        recvmsg: the reply to a request usually comes within that, and catching it awake saves
        the wake-up, which costs more than the whole round trip across CPUs on a VM.
        """
        if self.error is not None:
            raise self.error
        if not self.blocking:
            if not self._recv(0):
                return []
        elif self._sent_user and (deadline := self.spin_deadline()):
            recv = self._recv
            while not recv(_DONTWAIT):
                if _monotonic() >= deadline:
                    self.spin.outcome(False)
                    recv(0)
                    break
                _yield()  # lets whatever else wants this CPU run: the spin only uses idle time
            else:
                self.spin.outcome(True)
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
            self._fds.extend(fds_in(anc))
        if mflags & _CTRUNC:
            self.error = ProtocolError("descriptors were lost in transit (MSG_CTRUNC)")
            raise self.error
        if not n:
            raise ChannelClosed("peer closed the channel")
        self._end = end + n
        self.bytes_read += n
        self._last_write = 0.0  # a send that answers what came is no burst: it goes out at once
        return True

    def _parse(self, decode_them: bool) -> list[tuple[int, Any, list[int]]]:
        """Every whole frame in the buffer; keep the partial one and make room for the rest of it."""
        buf, view = self._rbuf, self._rview
        pos, end = self._start, self._end
        frames: list[tuple[int, Any, list[int]]] = []
        append = frames.append
        fdq = self._fds
        scan = _scan
        own, limit = self.kind, self.max_message
        error: ProtocolError | None = None
        while end - pos >= HEADER_SIZE:
            length, kind, flags, nfds = _unpack_from(buf, pos)
            if (kind != own and kind != KIND_INTERNAL) or flags or length > limit or nfds > len(fdq):
                error = self._bad_header(length, kind, flags, nfds)
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
            self.error = error
            self._start = self._end = 0
            if not frames:
                raise error
            return frames
        if fdq:
            self._drop_unclaimed(pos, end)
        if pos == end:
            self._start = self._end = 0
            if buf is not self._small:  # a big frame is done: give its buffer back
                self._rbuf, self._rview = self._small, memoryview(self._small)
        else:
            self._start = pos
            self._make_room()
        return frames

    def _bad_header(self, length: int, kind: int, flags: int, nfds: int) -> ProtocolError:
        if length > self.max_message:
            return ProtocolError(f"the peer sent a frame of {length} bytes, over the channel's limit of "
                                 f"{self.max_message} bytes (max_message_size)")
        if kind <= KIND_PICKLE and kind != self.kind:
            return ProtocolError(f"the peer sent a {_KIND_NAMES[kind]} frame on a {_KIND_NAMES[self.kind]} "
                                 "channel")
        return ProtocolError(f"bad frame header (kind={kind}, flags={flags}, length={length}, "
                             f"fds={nfds}, fds waiting={len(self._fds)})")

    def _drop_unclaimed(self, pos: int, end: int) -> None:
        """Close the descriptors no frame can claim (a peer could pile them up otherwise).

        Descriptors arrive with the first byte of the frame that claims them (see flush), so after
        parsing only the partial frame may claim any: its count, or up to MAX_FDS while its header
        is incomplete. Those left are the newest.
        """
        left = end - pos
        keep = _unpack_from(self._rbuf, pos)[3] if left >= HEADER_SIZE else MAX_FDS if left else 0
        fdq = self._fds
        while len(fdq) > keep:
            try:
                os.close(fdq.pop())
            except OSError:
                pass

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

    def shutdown(self) -> None:
        """Signal EOF both ways; wakes a thread blocked reading this end (close() would not)."""
        with self._wlock:
            self._fail()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Close the socket and any received descriptors no frame claimed."""
        with self._wlock:
            self._fail()
        close_fds(self._fds)
        self._fds.clear()
        try:
            self.sock.close()
        except OSError:
            pass



def fds_in(anc: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS message of recvmsg's ancillary data carries."""
    fds = array.array("i")
    for level, ctype, cdata in anc:
        if level == _SOL_SOCKET and ctype == _SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    return list(fds)


def close_fds(fds: Iterable[int]) -> None:
    """Close received descriptors nobody will use (errors ignored: they may be gone already)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
