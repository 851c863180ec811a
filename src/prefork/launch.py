"""--user, --group, --umask: who the workers (and fork templates) run as, resolved once at start.

A primary started as root (to bind port 80, read a TLS key, write to /var/run) should not run the
app as root: its workers drop to the user and group given, with no supplementary groups (root's
would stay otherwise), and take the umask given. Each spawned process gets them from
subprocess.Popen (`popen_kwargs`), which sets them between fork and exec: the workers that start as
fresh interpreters, and serve's templates (versions.py), whose forked workers inherit them.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from typing import Any


class LaunchError(Exception):
    """A bad --user or --group: one line, exit 2 (cli/supervised.py turns it into a UsageError)."""


@dataclass(frozen=True)
class Launch:
    """What each new worker process becomes. None: unchanged (the primary's)."""

    uid: int | None = None
    gid: int | None = None
    umask: int | None = None

    def popen_kwargs(self) -> dict[str, Any]:
        """The keywords of subprocess.Popen that apply this to a spawned worker."""
        kwargs: dict[str, Any] = {}
        if self.uid is not None or self.gid is not None:
            kwargs["extra_groups"] = []  # no supplementary group of root's
        if self.gid is not None:
            kwargs["group"] = self.gid
        if self.uid is not None:
            kwargs["user"] = self.uid
        if self.umask is not None:
            kwargs["umask"] = self.umask
        return kwargs


def from_options(opts: dict[str, Any]) -> Launch | None:
    """The Launch of --user/--group/--umask (None when none is given); LaunchError if a user or
    group does not exist, or if they are given to a primary that is not root."""
    user, group, umask = opts.get("user"), opts.get("group"), opts.get("umask")
    if user is None and group is None and umask is None:
        return None
    uid = gid = None
    if user is not None:
        uid, gid = _user(str(user))
    if group is not None:
        gid = _group(str(group))
    if uid is not None and gid is None:  # else the workers would keep the primary's group, root's
        raise LaunchError(f"--user {user}: uid {uid} has no entry in the user database, so its group "
                          "is unknown: give --group too")
    if os.geteuid() != 0:  # our own user and group are no change; another one needs root
        if uid is not None and uid != os.getuid():
            raise LaunchError(f"--user {user}: only a primary started as root can run its workers as "
                              f"another user (this one runs as uid {os.geteuid()})")
        if gid is not None and gid != os.getgid():
            raise LaunchError(f"--group {group}: only a primary started as root can run its workers in "
                              f"another group (this one runs as gid {os.getgid()})")
        uid = gid = None  # (dropping supplementary groups would need root too)
        if umask is None:
            return None
    return Launch(uid, gid, umask)


def _user(user: str) -> tuple[int, int | None]:
    """A user's uid and primary group, by name or number."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if user.isdigit():  # a uid with no passwd entry (a container's): allowed, its group must be given
            return int(user), None
        raise LaunchError(f"--user {user}: no such user (give a user name or a numeric uid)") from None
    return entry.pw_uid, entry.pw_gid


def _group(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise LaunchError(f"--group {group}: no such group (give a group name or a numeric gid)") from None
