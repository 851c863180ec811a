"""`wsgi.file_wrapper` (PEP 3333's optional platform-specific file handling) and the sendfile(2)
path of the WSGI bridge (wsgi.py).

An app returns `environ["wsgi.file_wrapper"](open(path, "rb"))` (Django's FileResponse, werkzeug's
send_file do when it is there). When the body is a regular file, the response says its
Content-Length, the connection is plain TCP or unix (not TLS) and the response goes through
onewrite's cycle (not wrapped by the access log, whose byte count needs the body), the file goes
from the page cache to the socket with os.sendfile, in the app's thread: no read into Python, no
hop to the loop per block. Otherwise the wrapper is iterated in blocks like any other body.

How it shares the socket with uvicorn's transport: on the loop, the head is written and the
transport's buffer is waited empty, and the socket's descriptor is dup()ed (so that a client that
leaves, closing the transport's descriptor, cannot hand its number to the next connection while
this thread still writes); the thread then writes the file to the dup, polling it while the
socket's buffer is full, each wait bounded by the bridge's timeout; back on the loop the cycle
counts the bytes as sent and ends the response, so keep-alive and the next request go on as usual.
Nothing else writes to the connection meanwhile: uvicorn writes only for the response in progress.
"""

from __future__ import annotations

import asyncio
import os
import select
import stat
from typing import Any

BLOCK = 64 << 10  # blocks read when the file cannot be sent with sendfile (PEP 3333's blksize is a hint)
SENDFILE_FROM = 64 << 10  # a smaller file is read and written at once: cheaper than the two more hops


class FileWrapper:
    """PEP 3333's wsgi.file_wrapper: iterates the file in blocks; close() closes it."""

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = max(int(blksize), BLOCK)
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> FileWrapper:
        return self

    def __next__(self) -> bytes:
        data = self.filelike.read(self.blksize)
        if data:
            return bytes(data)
        raise StopIteration


def plan(wrapper: Any, method: str, status: int, headers: list[tuple[bytes, bytes]],
         send: Any) -> tuple[Any, int, int, int] | None:
    """(cycle, file descriptor, offset, count) when this response can go out with sendfile, else None."""
    if type(wrapper) is not FileWrapper or method == "HEAD" or status < 200 or status in (204, 304):
        return None
    length = None
    for name, value in headers:
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name == b"transfer-encoding":
            return None
    if length is None or length < SENDFILE_FROM:
        return None
    from .onewrite import Cycle  # the cycle whose accounting finish() keeps

    cycle = getattr(send, "__self__", None)
    if not isinstance(cycle, Cycle) or cycle.access_log:
        return None
    transport = cycle.transport
    if transport.get_extra_info("ssl_object") is not None or transport.get_extra_info("socket") is None:
        return None
    try:
        fd = wrapper.filelike.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        tell = getattr(wrapper.filelike, "tell", None)
        offset = tell() if tell is not None else os.lseek(fd, 0, os.SEEK_CUR)
    except (AttributeError, OSError, ValueError):  # no descriptor (BytesIO), closed, a pipe...
        return None
    return cycle, fd, offset, length


async def open_socket(cycle: Any, start: dict[str, Any], timeout: float | None) -> int | None:
    """On the loop: send the head, wait until the transport has written it, and return a dup of the
    socket's descriptor (None when the client has gone, or read nothing for `timeout` seconds)."""
    await cycle.send(start)
    await cycle.send({"type": "http.response.body", "body": b"", "more_body": True})  # the head goes out
    transport = cycle.transport
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while not cycle.disconnected and not transport.is_closing() and transport.get_write_buffer_size():
        if deadline is not None and loop.time() > deadline:
            await finish(cycle, 0, False)
            return None
        await asyncio.sleep(0.001)
    if cycle.disconnected or transport.is_closing():
        return None
    return os.dup(transport.get_extra_info("socket").fileno())


def pump(out_fd: int, in_fd: int, offset: int, count: int, timeout: float | None) -> int:
    """os.sendfile until `count` bytes went or the file ended; bytes sent. OSError (the client left,
    or did not read for `timeout` seconds: TimeoutError) ends it."""
    poller = select.poll()
    poller.register(out_fd, select.POLLOUT)
    wait_ms = -1 if timeout is None else int(timeout * 1000)
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(out_fd, in_fd, offset + sent, count - sent)
        except (BlockingIOError, InterruptedError):
            if not poller.poll(wait_ms):
                raise TimeoutError(f"the client read nothing for {timeout:g} s") from None
            continue
        if n == 0:  # the file is shorter than its Content-Length said
            break
        sent += n
    return sent


async def finish(cycle: Any, sent: int, ok: bool) -> None:
    """On the loop: count what sendfile wrote and end the response (a short or failed one closes
    the connection, as any body shorter than its Content-Length does)."""
    if not ok or sent < cycle.expected_content_length:
        cycle.keep_alive = False
        cycle.disconnected = True  # the app's task ends quietly: the response cannot be completed
        cycle.transport.close()
        return
    cycle.expected_content_length -= sent
    await cycle.send({"type": "http.response.body", "body": b""})
