"""--pid FILE (gunicorn's --pid, --pidfile): the primary's pid, for init scripts and monitors.

Written atomically (a temporary file in the same folder, renamed over it: a reader never sees a
half-written number) once the control socket is up; removed on exit only if it still names this
process, since a hot upgrade's new primary rewrites it with its own pid and the old one must then
leave it. A file naming another live prefork refuses the start; a stale one (its process gone, or
not a prefork) is replaced.
"""

from __future__ import annotations

import os

from prefork import upgrade

from . import output


class PidFile:
    """One --pid file; every method does nothing without one."""

    def __init__(self, path: str | None) -> None:
        self.path = os.path.abspath(path) if path else None
        self.pid = os.getpid()
        self.written = False

    def check(self) -> bool:
        """False (with one line printed: exit 1) if the file names another running prefork."""
        if self.path is None:
            return True
        other = read_pid(self.path)
        if other is not None and other not in (self.pid, upgrade.previous_pid()) and _is_prefork(other):
            output.error(f"already running as pid {other} ({self.path})")
            return False
        return True

    def write(self) -> bool:
        """Write our pid; False (with one line printed: exit 1) if it cannot be written."""
        if self.path is None:
            return True
        if not self.check():  # again: another one may have started meanwhile
            return False
        folder = os.path.dirname(self.path)
        temp = os.path.join(folder, f".{os.path.basename(self.path)}.{self.pid}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, f"{self.pid}\n".encode())
            finally:
                os.close(fd)
            os.rename(temp, self.path)
        except OSError as exc:
            try:
                os.unlink(temp)
            except OSError:
                pass
            output.error(f"--pid {self.path}: cannot write it: {exc.strerror or exc}")
            return False
        self.written = True
        return True

    def remove(self) -> None:
        """Remove the file if it still names this process (never raises)."""
        if self.path is None or not self.written:
            return
        if read_pid(self.path) == self.pid:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def read_pid(path: str) -> int | None:
    """The pid a file names, or None (no file, unreadable, not a number)."""
    try:
        with open(path, "rb") as f:
            text = f.read(64).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and 0 < int(text) < 1 << 22 else None


def _is_prefork(pid: int) -> bool:
    """Whether `pid` is a live process whose command line mentions prefork (a reused pid is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read(65536)
    except OSError:
        return False
    if stat[stat.rindex(b")") + 2:][:1] in (b"Z", b"X"):  # exited, not yet reaped
        return False
    return b"prefork" in cmdline
