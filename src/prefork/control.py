"""The control socket: how `prefork ctl` talks to a running primary.

A unix stream socket, mode 0600, in a per-user folder (mode 0700) by default. Each connection
carries one JSON request line and gets one JSON reply line, whatever it sent. Both ends check the
other: the primary refuses a peer of another uid (SO_PEERCRED), even if the file's mode was
loosened; the client refuses, before it sends anything, a folder another user could write to or
owns, a socket file another user owns, and a server process of another uid. Standard library only:
the primary of `prefork run` needs no extra.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

DEFAULT_NAME = "prefork.sock"
MAX_REQUEST = 64 * 1024
MAX_REPLY = 16 * 1024 * 1024  # a status of 1024 workers is well under 1 MiB
MAX_CONNECTIONS = 32  # concurrent control connections; more are refused with an error reply
READ_TIMEOUT = 10.0  # a client gets this long, in all, to send its request line
ACCEPT_WAKE = 0.5  # how often the accept loop looks whether it was closed
_MAX_DRAIN = 4 * 1024 * 1024  # after an oversized request, read at most this much more before closing


class ControlError(Exception):
    """A control socket problem, worded for a person."""


def default_dir() -> str:
    """$XDG_RUNTIME_DIR/prefork when that folder is ours, else /tmp/prefork-UID (made 0700 by the primary)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    try:  # after `su` or `sudo` the variable may still name the first user's folder
        st = os.stat(runtime) if runtime else None
    except OSError:
        st = None
    if runtime and st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        return os.path.join(runtime, "prefork")
    return os.path.join("/tmp", f"prefork-{os.getuid()}")


def default_path(name: str | None = None) -> str:
    """The per-user default socket; `NAME.sock` for a server given --name (two named servers, two
    sockets; `prefork ctl --name NAME` finds it)."""
    return os.path.join(default_dir(), f"{name}.sock" if name else DEFAULT_NAME)


def _owner_problem(path: str, st: os.stat_result, what: str) -> str:
    return (f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}): another user "
            "made it")


def _private_dir(path: str) -> None:
    """Make the per-user folder, and refuse one that another user owns (chmod 0700 one of ours)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ControlError(f"cannot make the control folder {path}: {exc.strerror}; pass --control PATH") \
            from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"control folder {path} is not a folder (a symlink or a file is in the way); "
                           "remove it or pass --control PATH")
    if st.st_uid != os.getuid():
        raise ControlError(_owner_problem(path, st, "control folder") + "; remove it (as that user or "
                           "root) or pass --control PATH")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end, from the kernel (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class ControlServer:
    """Serves control requests in a thread; `handler(request) -> reply` does the work."""

    def __init__(self, path: str | None, handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.path = os.path.abspath(path) if path else default_path()
        self.handler = handler
        self.sock: socket.socket | None = None
        self._held: socket.socket | None = None  # passed by a previous primary, not served yet
        self._inode: int | None = None
        self._closed = False
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._refusals = threading.BoundedSemaphore(MAX_CONNECTIONS)  # threads that say "too many"

    def start(self) -> None:
        """Bind (0600 from the start: no window where others could connect) and serve."""
        from .upgrade import take_control

        sock = take_control(self.path)  # a hot upgrade: the previous primary's socket (upgrade.py),
        if sock is not None:  # served (and its file ours) once our workers are ready: take_over()
            self._held = sock
            return
        folder = os.path.dirname(self.path)
        if folder == default_dir():  # prefork.sock or a --name's NAME.sock
            _private_dir(folder)
        elif not os.path.isdir(folder):
            raise ControlError(f"control socket {self.path}: no such folder {folder}")
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        except OSError as exc:
            sock.close()
            raise ControlError(f"control socket {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        self._serve_on(sock)

    def _serve_on(self, sock: socket.socket) -> None:
        # accept with a timeout: a blocked accept() would still take a connection after close(),
        # and after a hot upgrade the new primary serves this same socket (upgrade.py)
        sock.settimeout(ACCEPT_WAKE)
        self.sock = sock
        self._inode = os.stat(self.path).st_ino
        threading.Thread(target=self._serve, name="prefork-control", daemon=True).start()

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"control socket {self.path}: a file that is not a socket is in the way")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.path)  # left by a primary that died
            return
        except OSError:
            pass
        finally:
            probe.close()
        raise ControlError(f"control socket {self.path} is in use by another prefork primary; "
                           "pass --control PATH to run a second one")

    def _serve(self) -> None:
        while not self._closed:
            sock = self.sock
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._closed or exc.errno in (errno.EBADF, errno.EINVAL):  # closed under us
                    return
                time.sleep(0.1)  # EMFILE and the like: wait for descriptors rather than spin
                continue
            try:
                self._dispatch(conn)
            except Exception:  # nothing may end this thread: close the one connection and go on
                conn.close()

    def _dispatch(self, conn: socket.socket) -> None:
        if self._slots.acquire(blocking=False):
            target, slots = self._answer, self._slots
        elif self._refusals.acquire(blocking=False):
            target, slots = _refuse_busy, self._refusals
        else:  # a flood: close at once, the client sees a reset
            conn.close()
            return
        try:
            threading.Thread(target=_hold, args=(target, conn, slots), name="prefork-control-conn",
                             daemon=True).start()
        except BaseException:
            slots.release()
            raise

    def _answer(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + READ_TIMEOUT
        uid = peer_uid(conn)
        # read first even when refusing: closing on unread data would reset the connection, and the
        # client would see a broken pipe instead of the reason
        try:
            data, ended = _read_line(conn, deadline)
        except TimeoutError:
            _send(conn, _error(f"no request line within {READ_TIMEOUT:g} s"))
            return
        if uid != os.getuid():
            reply: dict[str, Any] = _error(f"permission denied: uid {uid} may not control this primary "
                                           f"(owner uid {os.getuid()})")
        elif len(data) > MAX_REQUEST:
            _send(conn, _error(f"request too large (over {MAX_REQUEST // 1024} KiB)"))
            if not ended:
                _drain(conn, deadline)
            return
        else:
            reply = self._reply(data)
        _send(conn, reply)

    def _reply(self, data: bytes) -> dict[str, Any]:
        if not data.strip():
            return _error("empty request: expected one JSON object such as {\"cmd\": \"status\"}")
        try:
            request = json.loads(data)
        except RecursionError:
            return _error("bad request: JSON nested too deeply")
        except ValueError as exc:  # also UnicodeDecodeError
            return _error(f"bad request: not JSON ({exc})")
        if not isinstance(request, dict):
            return _error(f"bad request: expected a JSON object, not {type(request).__name__}")
        try:
            reply = self.handler(request)
        except Exception as exc:  # a bad request must not take the primary down
            return _error(str(exc) or type(exc).__name__)
        if not isinstance(reply, dict):
            return _error("the primary gave no answer")
        if isinstance(reply.get("error"), str):
            reply = {**reply, "error": _error(reply["error"])["error"]}  # it may quote the request
        return reply

    def take_over(self) -> None:
        """A hot upgrade's new primary is ready: serve the socket the previous one passed."""
        sock, self._held = self._held, None
        if sock is not None and not self._closed:
            self._serve_on(sock)

    def hand_over(self) -> None:
        """A hot upgrade's new primary serves this socket now: stop serving, leave the file."""
        self._inode = None
        self.close()

    def close(self) -> None:
        """Stop serving and remove the socket file, unless another primary has replaced it."""
        self._closed = True
        if self._held is not None:  # never served: the file is the previous primary's
            self._held.close()
            self._held = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass


def _error(message: str) -> dict[str, Any]:
    if len(message) > 500:  # messages may quote the request: keep the reply small
        message = message[:500] + "..."
    return {"ok": False, "error": message}


def _encode(message: dict[str, Any]) -> bytes:
    try:
        data = json.dumps(message).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        data = json.dumps(_error(f"the primary could not encode its answer: {exc}")).encode()
    if len(data) > MAX_REPLY:
        data = json.dumps(_error(f"the answer is too large ({len(data)} bytes)")).encode()
    return data + b"\n"


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.settimeout(READ_TIMEOUT)  # a client that does not read its reply holds a slot this long at most
    conn.sendall(_encode(message))


def _hold(target: Callable[[socket.socket], None], conn: socket.socket, slots: threading.Semaphore) -> None:
    """Run `target(conn)` in a connection's thread; then close it and give its slot back."""
    try:
        with conn:
            target(conn)
    except Exception:
        pass  # the client went away, or sent nothing in time: nothing more to say
    finally:
        slots.release()


def _refuse_busy(conn: socket.socket) -> None:
    """Too many control connections at once: read the request for up to a second (closing on it unread
    could reset the connection before the client reads why), then an error line."""
    try:
        _read_line(conn, time.monotonic() + 1.0)
    except OSError:  # also TimeoutError
        pass
    _send(conn, _error(f"too many control connections (more than {MAX_CONNECTIONS} at once); try again"))


def _read_line(conn: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """The request line (without its newline), read until a newline or EOF but stopping once it is over
    MAX_REQUEST; also whether the client's input ended (False: more may follow)."""
    data = b""
    while b"\n" not in data and len(data) <= MAX_REQUEST:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.settimeout(left)
        chunk = conn.recv(65536)
        if not chunk:
            return data, True
        data += chunk
    line, newline, _ = data.partition(b"\n")
    return line, bool(newline)


def _drain(conn: socket.socket, deadline: float) -> None:
    """Read (and drop) the rest of an oversized request, so the client's send does not fail."""
    seen = 0
    try:
        conn.shutdown(socket.SHUT_WR)
        while seen < _MAX_DRAIN:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            conn.settimeout(left)
            chunk = conn.recv(65536)
            if not chunk or b"\n" in chunk:
                return
            seen += len(chunk)
    except OSError:
        pass


# -- the client --------------------------------------------------------------------------------------


def _check_folder(folder: str, default: bool) -> None:
    """Refuse a folder where another user could have put the socket, before connecting to it."""
    try:
        st = os.stat(folder)
    except OSError:
        return  # connect() says what is missing
    mode = stat.S_IMODE(st.st_mode)
    if default:
        if st.st_uid != os.getuid():
            raise ControlError(_owner_problem(folder, st, "control folder") + "; not talking to what "
                               "listens there (remove the folder, or pass --control PATH)")
        if mode & 0o022:
            raise ControlError(f"control folder {folder} is writable by other users (mode {mode:04o}, "
                               "0700 expected); not talking to what listens there")
    elif mode & 0o002 and not mode & stat.S_ISVTX:
        raise ControlError(f"control folder {folder} is writable by every user (mode {mode:04o}) and "
                           "not sticky: anyone could have replaced the socket; not talking to it")


def _check_socket_file(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError:
        return  # connect() says what is missing
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} is not a prefork control socket (not a socket)")
    if st.st_uid != os.getuid():
        raise ControlError(_owner_problem(path, st, "control socket") + "; not talking to it")


def _connect(path: str, sock: socket.socket) -> None:
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise ControlError(f"no primary: control socket {path} does not exist "
                           "(is prefork serve/run running? pass --control PATH)") from None
    except ConnectionRefusedError:
        raise ControlError(f"no primary is listening on control socket {path} (it has stopped)") from None
    except PermissionError:
        raise ControlError(f"permission denied connecting to control socket {path} "
                           "(it belongs to another user)") from None
    except TimeoutError:
        raise ControlError(f"control socket {path}: the primary did not accept the connection in time") \
            from None
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
    uid = peer_uid(sock)
    if uid != os.getuid():
        raise ControlError(f"the process behind control socket {path} runs as uid {uid}, not as you "
                           f"(uid {os.getuid()}); not talking to it")


def request(path: str | None, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the primary behind `path` and return its reply; ControlError if none.

    Nothing is sent before the folder, the socket file and the server's uid have been checked."""
    default = not path or os.path.dirname(os.path.abspath(path)) == default_dir()
    path = os.path.abspath(path) if path else default_path()
    _check_folder(os.path.dirname(path), default)
    _check_socket_file(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    data = b""
    try:
        _connect(path, sock)
        try:
            sock.sendall(_encode(message))
        except OSError:
            pass  # refused early (busy, too large): the reason may be waiting to be read
        try:
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_REPLY + 1:
                    raise ControlError(f"{path}: the reply is too large; not a prefork control socket?")
        except TimeoutError:
            raise ControlError(f"the primary behind {path} did not answer within {timeout:g} s") from None
        except OSError as exc:
            if not data:
                raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    if not data:
        raise ControlError(f"the primary behind {path} closed the connection without answering")
    try:
        reply = json.loads(data)
    except (ValueError, RecursionError):
        raise ControlError(f"{path}: not a prefork control socket (bad reply)") from None
    if not isinstance(reply, dict):
        raise ControlError(f"{path}: not a prefork control socket (bad reply)")
    return reply
