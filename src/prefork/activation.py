"""Listening sockets a service manager opened for us: systemd's socket activation, and `fd://N` binds.

systemd (or `systemd-socket-activate`) starts the service with the sockets as descriptors 3, 4, ...
and says so in the environment: `LISTEN_PID` (the pid they are meant for: a child that inherits the
environment must not take them for its own), `LISTEN_FDS` (how many) and `LISTEN_FDNAMES` (their
names, colon-separated, from `FileDescriptorName=`). This is `sd_listen_fds_with_names(unset=1)`
written out: the variables are removed once read, so no worker sees them.

A descriptor is served only if it is what a plain server would have made: a listening stream socket
of a family prefork serves (TCP over IPv4 or IPv6, or unix). Anything else is one line for a person.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

from . import binding

FIRST_FD = 3  # SD_LISTEN_FDS_START
MAX_FDS = 1024  # far more sockets than a unit lists; a garbage LISTEN_FDS must not loop for long
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
FAMILIES = {socket.AF_INET: "tcp", socket.AF_INET6: "tcp", socket.AF_UNIX: "unix"}


# The descriptors systemd passed (fd -> its name), for a hot upgrade: the new primary serves them in
# place of its --bind addresses too (upgrade.py)
ACTIVATED: dict[int, str | None] = {}


class ActivationError(Exception):
    """An unusable descriptor or variable: the message is one line for a person."""


@dataclass
class Inherited:
    """A checked listening socket, and the address it is bound to."""

    fd: int
    name: str | None  # LISTEN_FDNAMES' name, if given
    sock: socket.socket
    bind: list[Any]  # ["tcp", host, port] or ["unix", path]: what the workers listen on

    def show(self, how: str) -> str:
        where = f"{self.bind[1]}:{self.bind[2]}" if self.bind[0] == "tcp" else f"unix:{self.bind[1]}"
        if self.bind[0] == "tcp" and ":" in self.bind[1]:
            where = f"[{self.bind[1]}]:{self.bind[2]}"
        named = f" {self.name!r}" if self.name and self.name not in ("unknown", "connection") else ""
        return f"fd://{self.fd} ({how}{named}, {where})"


def listen_fds(environ: Any = None, pid: int | None = None) -> list[tuple[int, str | None]] | None:
    """[(fd, name)] passed to this process, or None when nothing was; the variables are removed
    from `environ` (os.environ by default) either way, so children never see them."""
    environ = os.environ if environ is None else environ
    values = {name: environ.pop(name, None) for name in VARIABLES}
    listen_pid, count = values["LISTEN_PID"], values["LISTEN_FDS"]
    if listen_pid is None or count is None:
        return None
    if not listen_pid.strip().isdigit() or int(listen_pid) != (os.getpid() if pid is None else pid):
        return None  # meant for another process (ours is a child of the one systemd started)
    text = count.strip()
    if not text.isdigit() or not 0 <= int(text) <= MAX_FDS:
        raise ActivationError(f"LISTEN_FDS={count!r}: expected the number of descriptors passed (0 to "
                              f"{MAX_FDS})")
    n = int(text)
    names: list[str | None] = list((values["LISTEN_FDNAMES"] or "").split(":"))
    if len(names) != n:  # absent, or not one per descriptor: names only label the banner
        names = [None] * n
    return [(FIRST_FD + i, names[i] or None) for i in range(n)]


def inspect(fd: int, name: str | None = None) -> Inherited:
    """Check that `fd` is a listening stream socket we can serve, and take it (close-on-exec)."""
    shown = f"fd://{fd}"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise ActivationError(f"{shown}: no such descriptor is open (was it passed to prefork?)") \
                from None
        raise ActivationError(f"{shown}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"{shown}: not a socket (a {_kind(mode)})")
    sock = socket.socket(fileno=fd)
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family not in FAMILIES:
            raise ActivationError(f"{shown}: a socket of family {sock.family!r}; prefork serves TCP and unix "
                                  "sockets")
        if kind != socket.SOCK_STREAM:
            raise ActivationError(f"{shown}: not a stream socket (datagram sockets carry no HTTP)")
        if not listening:
            raise ActivationError(f"{shown}: a socket that is not listening (it must be bound and "
                                  "listen()ed, as systemd's ListenStream= sockets are)")
        bind = _bind_of(sock)
    except BaseException:
        sock.detach()  # not ours to close: leave the descriptor as it came
        raise
    os.set_inheritable(fd, False)  # as sd_listen_fds: a spawned program does not inherit it
    sock.setblocking(False)
    return Inherited(fd, name, sock, bind)


def _bind_of(sock: socket.socket) -> list[Any]:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        path = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name
        if not path:
            raise ActivationError(f"fd://{sock.fileno()}: an unnamed unix socket (nothing can connect to it)")
        return ["unix", path]
    return ["tcp", name[0], int(name[1])]


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "pipe"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "file that is not a socket"


def take(binds: list[list[Any]], environ: Any = None) -> list[tuple[list[Any], str | None]]:
    """What to serve: [(bind, label)], label None for an address to bind as usual, else how the
    socket came ("fd://3 (systemd socket activation, 127.0.0.1:8000)"); the bind of an inherited
    socket is its address, which binding.py then serves from the inherited socket.

    Sockets passed by socket activation replace the --bind addresses; `fd://N` binds are kept."""
    passed = listen_fds(environ)
    items: list[tuple[int, str | None, str]] = []
    if passed:
        items = [(fd, name, "systemd socket activation") for fd, name in passed]
    for bind in binds:  # once each: two socket objects on one descriptor would close it twice
        if bind[0] == "fd" and bind[1] not in {fd for fd, _, _ in items}:
            items.append((bind[1], None, "inherited"))
    out: list[tuple[list[Any], str | None]] = []
    if not passed:
        out = [(b, None) for b in binds if b[0] != "fd"]
    for fd, name, how in items:
        found = inspect(fd, name)
        addr = found.bind[1] if found.bind[0] == "unix" else tuple(found.bind[1:])
        binding.adopt(found.sock.family, addr, found.sock)
        if how == "systemd socket activation":
            ACTIVATED[fd] = name
        out.append((found.bind, found.show(how)))
    return out
