"""The new primary's side of a hot upgrade (upgrade.py): what the previous primary passed.

PREFORK_UPGRADE (JSON) names the descriptors passed: the listening sockets (by the address workers
listen on; each SO_REUSEPORT socket of a group; those systemd passed marked "activated"), the control
socket (with its path), the admin socket, one end of a socketpair for the handshake, and the old
primary's stderr. Everything is checked: a descriptor must be an open listening socket of the right
kind, or it is not used. Read once, before any worker starts; the variable is then removed, so no
worker sees it.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from collections.abc import Callable
from typing import Any

from . import _stdio, binding

ENV = "PREFORK_UPGRADE"
MAX_ENV = 1 << 20


class Passed:
    """The sockets a previous primary passed (PREFORK_UPGRADE), checked; see the module docstring."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.previous_pid = _int(spec.get("pid"))
        self.ready_fd = _fd(spec.get("ready"))
        self.stderr_fd = _fd(spec.get("stderr"))
        self.pipe = spec.get("pipe") if isinstance(spec.get("pipe"), int) else None
        control = spec.get("control") if isinstance(spec.get("control"), dict) else {}
        self.control_fd, self.control_path = _fd(control.get("fd")), control.get("path")
        self.admin_fd = _fd(spec.get("admin"))
        self.listeners = [item for item in spec.get("listeners") or [] if isinstance(item, dict)][:65536]
        self.control_taken = self.admin_taken = self.said = False
        self.activated: list[Any] = []  # activation.Inherited: systemd's sockets, passed on to us
        for fd in (self.ready_fd, self.stderr_fd, self.control_fd, self.admin_fd):
            if fd is not None:
                try:
                    os.set_inheritable(fd, False)  # ours alone: never a worker's
                except OSError:
                    pass

    def adopt_listeners(self, log: Callable[[str], None]) -> None:
        """Serve each passed listening socket where a worker listens on its address (binding.py); an
        fd:// bind of the new command line already took its own."""
        from .activation import ActivationError, inspect

        taken = binding.adopted_fds()
        for item in self.listeners:
            fd, addr = _fd(item.get("fd")), item.get("addr")
            if fd is None or fd in taken:
                continue
            try:
                name = item.get("name") if isinstance(item.get("name"), str) else None
                found = inspect(fd, name)
            except ActivationError as exc:
                log(f"upgrade: a passed socket is not usable: {exc}")
                continue
            if not (isinstance(addr, str) or (isinstance(addr, list) and len(addr) == 2
                                              and isinstance(addr[0], str) and isinstance(addr[1], int))):
                addr = found.bind[1] if found.bind[0] == "unix" else found.bind[1:]
            key = addr if isinstance(addr, str) else (addr[0], addr[1])
            if item.get("slot") is True:
                binding.adopt_slot(found.sock.family, key, found.sock)
            else:
                binding.adopt(found.sock.family, key, found.sock)
            if item.get("activated") is True:
                self.activated.append(found)
        self.listeners = []

    def take_control(self, path: str) -> socket.socket | None:
        fd, self.control_fd = self.control_fd, None
        if fd is None:
            return None
        if self.control_path != path or not _is_listening(fd, socket.AF_UNIX):
            os.close(fd)
            return None
        self.control_taken = True
        return socket.socket(fileno=fd)

    def take_admin(self, host: str, port: int) -> socket.socket | None:
        fd, self.admin_fd = self.admin_fd, None
        if fd is None:
            return None
        sock = socket.socket(fileno=fd) if _is_listening(fd, None) else None
        try:
            wanted = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][4]
        except (OSError, IndexError):
            wanted = None
        if sock is None or wanted is None or sock.getsockname()[0] != wanted[0] or (
                port and sock.getsockname()[1] != port):
            if sock is not None:
                sock.close()
            else:
                os.close(fd)
            return None
        self.admin_taken = True
        sock.setblocking(False)
        return sock

    def switch_stderr(self) -> None:
        """From the pipe to the old primary (read until our workers start) to its own stderr."""
        fd, self.stderr_fd = self.stderr_fd, None
        if fd is None:
            return
        try:
            st = os.fstat(2)
            if stat.S_ISFIFO(st.st_mode) and st.st_ino == self.pipe:  # not moved (--log-file moves it)
                sys.stderr.flush()
                os.dup2(fd, 2)
        except OSError:
            pass
        finally:
            os.close(fd)

    def say(self, line: str) -> None:
        """One line to the old primary, once: "ready {...}" or "failed WHY"."""
        self.said = True
        fd, self.ready_fd = self.ready_fd, None
        if fd is None:
            return
        try:
            os.write(fd, (" ".join(line.split())[:2000] + "\n").encode("utf-8", "replace"))
        except OSError:
            pass
        finally:
            os.close(fd)


_passed: list[Passed | None] = []


def passed(log: Callable[[str], None] | None = None) -> Passed | None:
    """What a previous primary passed (read once; the variable is removed so no worker sees it)."""
    if not _passed:
        text = os.environ.pop(ENV, None)
        found = None
        if text is not None:
            try:
                spec = json.loads(text[:MAX_ENV])
                found = Passed(spec if isinstance(spec, dict) else {})
            except (ValueError, RecursionError) as exc:
                _stdio.write(f"prefork: ignoring {ENV}: not JSON ({exc})\n")
        _passed.append(found)
        if found is not None:
            found.adopt_listeners(log or (lambda line: _stdio.write(f"prefork: {line}\n")))
    return _passed[0]


def previous_pid() -> int | None:
    """The pid of the primary that started this one for a hot upgrade (its --pid file names it)."""
    found = passed()
    return found.previous_pid if found is not None else None


def take_control(path: str) -> socket.socket | None:
    found = passed()
    return found.take_control(path) if found is not None else None


def take_admin(host: str, port: int) -> socket.socket | None:
    found = passed()
    return found.take_admin(host, port) if found is not None else None


def label_binds(opts: dict[str, Any], labels: list[str | None],
                log: Callable[[str], None]) -> list[str | None]:
    """`prefork serve`: the banner label of each bind served from a passed socket (None: bind it), so
    serve does not probe those addresses; reuseport over a passed plain socket falls back to rr."""
    from .address import normalize

    found = passed(log)
    if found is None:
        return labels
    plain = bool(found.activated)
    if found.activated:  # systemd's sockets replace the --bind addresses, as for the first primary
        kept = [(bind, label) for bind, label in zip(opts["bind"], labels, strict=True) if label]
        opts["bind"] = [bind for bind, _ in kept] + [each.bind for each in found.activated]
        labels = [label for _, label in kept] + [each.show("systemd socket activation")
                                                  for each in found.activated]
    out = []
    for bind, label in zip(opts["bind"], labels, strict=True):
        if label is None and bind[0] in ("tcp", "unix"):
            family, addr = normalize(bind[1] if bind[0] == "unix" else (bind[1], bind[2]))
            if binding.is_adopted(family, addr):
                plain = plain or (bind[0] == "tcp" and not binding.adopted_slots(family, addr))
                where = f"unix:{addr}" if bind[0] == "unix" else f"{addr[0]}:{addr[1]}"
                label = f"{where} (from the previous primary, pid {found.previous_pid})"
        out.append(label)
    if plain and (opts.get("policy") or "") == "reuseport":
        log("policy reuseport cannot serve a socket the previous primary served with another policy: "
            "using rr")
        opts["policy"] = "rr"
    return out


def _fd(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 3 <= value < 1 << 20 else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _is_listening(fd: int, family: int | None) -> bool:
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        probe = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        return bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)) and (
            family is None or probe.family == family)
    except OSError:
        return False
    finally:
        probe.close()
