"""The control socket: how `prefork ctl` talks to a running primary.

A unix stream socket, mode 0600, in a per-user folder (mode 0700) by default. Each connection
carries one JSON request line and gets one JSON reply line. The primary checks the peer's uid
with SO_PEERCRED and refuses any other user, even if the file's mode was loosened. Standard
library only: the primary of `prefork run` needs no extra.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from typing import Any

DEFAULT_NAME = "prefork.sock"
_MAX_REQUEST = 64 * 1024


class ControlError(Exception):
    """A control socket problem, worded for a person."""


def default_dir() -> str:
    """$XDG_RUNTIME_DIR/prefork, else /tmp/prefork-UID (created 0700 by the primary)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "prefork")
    return os.path.join("/tmp", f"prefork-{os.getuid()}")


def default_path() -> str:
    return os.path.join(default_dir(), DEFAULT_NAME)


def _private_dir(path: str) -> None:
    """Make the per-user folder, and refuse one that another user owns or others can write."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ControlError(f"control folder {path} is not a folder owned by you; pass --control PATH")
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
        self._inode: int | None = None
        self._closed = False

    def start(self) -> None:
        """Bind (0600 from the start: no window where others could connect) and serve."""
        folder = os.path.dirname(self.path)
        if self.path == default_path():
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
        sock.listen(16)
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
        sock = self.sock
        assert sock is not None
        while not self._closed:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), name="prefork-control-conn",
                             daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10.0)
            try:
                uid = peer_uid(conn)
                request = _recv(conn)  # read first even when refusing: closing on unread data would
                # reset the connection, and the client would see a broken pipe instead of the reason
                if uid != os.getuid():
                    _send(conn, {"ok": False, "error": f"permission denied: uid {uid} may not control "
                                                      f"this primary (owner uid {os.getuid()})"})
                    return
                try:
                    reply = self.handler(request)
                except Exception as exc:  # a bad request must not take the primary down
                    reply = {"ok": False, "error": str(exc) or type(exc).__name__}
                _send(conn, reply)
            except (OSError, ValueError):
                return

    def close(self) -> None:
        """Stop serving and remove the socket file, unless another primary has replaced it."""
        self._closed = True
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _recv(conn: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > _MAX_REQUEST:
            raise ValueError("request too large")
    message = json.loads(data or b"{}")
    if not isinstance(message, dict):
        raise ValueError("request must be a JSON object")
    return message


def request(path: str | None, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the primary behind `path` and return its reply; ControlError if none."""
    path = path or default_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
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
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK or exc.errno == errno.ECONNREFUSED:
                raise ControlError(f"{path} is not a prefork control socket") from None
            raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
        try:
            _send(sock, message)
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise ControlError(f"the primary behind {path} did not answer within {timeout:g} s") from None
        except OSError as exc:
            raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    if not data:
        raise ControlError(f"the primary behind {path} closed the connection without answering")
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"{path}: not a prefork control socket (bad reply)") from None
    if not isinstance(reply, dict):
        raise ControlError(f"{path}: not a prefork control socket (bad reply)")
    return reply
