"""systemd's notify protocol (`Type=notify-reload`), written out: no dependency.

systemd passes `NOTIFY_SOCKET`, an AF_UNIX datagram socket (a path, or an abstract name written with
a leading `@`), and the service sends it newline-separated `KEY=value` lines: `READY=1` when it
serves, `RELOADING=1` (with `MONOTONIC_USEC=`, which notify-reload requires) then `READY=1` around a
reload, `STOPPING=1`, free-text `STATUS=`, and `WATCHDOG=1` pings when `WATCHDOG_USEC` asks for them.

`Notifier` is a Supervisor watcher (supervisor.py `tell`), so every send happens on the primary's
loop thread. The watchdog ping is a loop timer that pings only while a worker is ready: a hung
loop, or a primary with no worker able to serve, stops pinging and systemd kills and restarts it.
A send never blocks and never fails the primary: a failure is logged once.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
MIN_PING_S = 0.05  # a tiny WATCHDOG_USEC must not turn the loop into a busy one


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def socket_address(value: str) -> str | bytes:
    """NOTIFY_SOCKET as sendto() takes it: "@name" is the abstract name "\\0name"."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8", "surrogateescape")
    return value


def from_environ(supervisor: Any, log: Callable[[str], None], environ: Any = None) -> Notifier | None:
    """A Notifier when systemd asked for notifications; the variables are removed from `environ`
    (os.environ by default) so that nothing the primary starts notifies in its name."""
    environ = os.environ if environ is None else environ
    values = {name: environ.pop(name, None) for name in VARIABLES}
    address = values["NOTIFY_SOCKET"]
    if not address or address == "@":
        return None
    interval = None
    usec, pid = values["WATCHDOG_USEC"], values["WATCHDOG_PID"]
    if usec is not None and (pid is None or pid.strip() == str(os.getpid())):
        if usec.strip().isdigit() and int(usec) > 0:
            interval = int(usec) / 1e6
        else:
            log(f"WATCHDOG_USEC={usec!r} is not a number of microseconds: no watchdog pings")
    return Notifier(address, supervisor, log, interval)


class Notifier:
    """Tells systemd the pool's state (see the module docstring). Methods run on the loop thread."""

    def __init__(self, address: str, supervisor: Any, log: Callable[[str], None],
                 watchdog_s: float | None = None) -> None:
        self.address = address
        self.supervisor = supervisor
        self.log = log
        self.watchdog_s = watchdog_s
        self.sock: socket.socket | None = None
        self.failed = False  # a send failed once (logged once)
        self.sent: list[str] = []  # the last messages, for tests and debugging (bounded)
        self._timer: Any = None
        self._last_status = ""

    # -- sending ---------------------------------------------------------------------------------

    def send(self, *lines: str) -> bool:
        message = "\n".join(lines)
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self.sock.setblocking(False)  # a full queue drops the message: never wait on the loop
            self.sock.sendto(message.encode("utf-8", "replace"), socket_address(self.address))
        except OSError as exc:
            if not self.failed:
                self.failed = True
                self.log(f"cannot notify systemd at NOTIFY_SOCKET={self.address}: {exc.strerror or exc} "
                         "(serving on; said once)")
            return False
        self.sent = [*self.sent[-31:], message]
        return True

    def status(self, prefix: str = "") -> str:
        sup = self.supervisor
        ready, target = sup.ready_count(), len(sup.slots)
        return f"STATUS={prefix}{ready} of {target} worker(s) ready"

    def _status_if_changed(self) -> None:
        line = self.status()
        if line != self._last_status:
            self._last_status = line
            self.send(line)

    # -- supervisor events -----------------------------------------------------------------------

    def on_ready(self) -> None:
        if self.supervisor.stopping:
            return
        self._last_status = self.status()
        self.send("READY=1", self._last_status)
        if self.watchdog_s and self._timer is None:
            self._watchdog()

    def on_reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", self.status("reloading; "))

    def on_reloaded(self, ok: bool, why: str) -> None:
        # READY=1 either way: the old workers serve on after a failed reload, and notify-reload
        # waits for READY=1 to end the reload job
        why = " ".join(why.split())[:200]  # one line: a newline would start another field
        self._last_status = self.status("reload done; " if ok else f"reload failed ({why}); ")
        self.send("READY=1", self._last_status)

    def on_stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def on_restart(self, member: Any) -> None:
        self._status_if_changed()

    def on_beat(self) -> None:
        if self.supervisor.all_ready and not self.supervisor.stopping:
            self._status_if_changed()

    # -- the watchdog ----------------------------------------------------------------------------

    def _watchdog(self) -> None:
        """Every half interval, from the loop: WATCHDOG=1 while at least one worker is ready."""
        assert self.watchdog_s is not None
        self._timer = self.supervisor.primary.loop.call_later(max(MIN_PING_S, self.watchdog_s / 2),
                                                               self._watchdog)
        if self.supervisor.ready_count() > 0:
            self.send("WATCHDOG=1")
