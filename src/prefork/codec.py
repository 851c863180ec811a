"""The channel's serializers: JSON (the default) and pickle, and the fast paths for big JSON messages.

channel.py frames what these produce; nothing here touches a socket. The speed tricks:
- the C JSON scanner and encoder are built once (json.dumps/loads rebuild or wrap them every call);
- a JSON message after a big one (BIG) is encoded with a string encoder that takes long strings
  needing no escape as they are (one scan, one UTF-8 copy) instead of escaping them character by
  character, and never copies them again: the payload is a list of buffers (the JSON around each
  long string, then the string's bytes) that the channel writes with one sendmsg, and queues as
  those same buffers (never joined into one);
- a big JSON payload made mostly of long strings is decoded without the scanner going over them
  character by character (see _loads_long).
"""

from __future__ import annotations

import json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

KIND_JSON, KIND_PICKLE, KIND_INTERNAL = 0, 1, 2  # a frame's kind byte; internal frames are JSON
BIG = 32 * 1024  # a JSON message this big makes the next one use the long-string encoder
_SERIALIZERS = {"json": KIND_JSON, "pickle": KIND_PICKLE}
_KIND_NAMES = ("json", "pickle", "internal")


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame: the channel cannot be trusted any more."""


def serialization_kind(name: str) -> int:
    try:
        return _SERIALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown serialization {name!r}: use 'json' or 'pickle'") from None


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


