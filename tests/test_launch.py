"""--user, --group, --umask (launch.py): a root primary runs its workers (and --preload's templates,
whose forks they are) as the user and group given, with no supplementary groups, and the umask
given; the app reports what its worker process is (tests/apps/hooks_whoami.py) (#12)."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys

import httpx
import pytest
from cli_helpers import free_port, prefork_cmd, run_prefork  # noqa: F401

APP = "tests.apps.hooks_whoami:app"
pytestmark = pytest.mark.timeout(60)
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="only a root primary can change its workers' user")


def _whoami(prefork_cmd, tmp_path, *flags: str) -> dict:  # noqa: F811
    port = free_port()
    cmd = prefork_cmd("serve", APP, "--workers", "1", "--lifespan", "off", "--bind", f"127.0.0.1:{port}",
                      "--control", str(tmp_path / "c.sock"), *flags)
    cmd.wait_ready(30)
    answer = httpx.get(f"http://127.0.0.1:{port}/", timeout=10).json()
    cmd.worker_pids.add(answer["pid"])
    assert answer["pid"] != cmd.proc.pid
    return answer


def _nobody_can_run_python() -> bool:
    """Whether user nobody may execute this interpreter (not when it lives under a 0700 /root)."""
    try:
        return subprocess.run([sys.executable, "-c", "pass"], user="nobody", group="nogroup",
                              capture_output=True, timeout=30).returncode == 0
    except (PermissionError, KeyError):
        return False


@ROOT_ONLY
@pytest.mark.parametrize("preload", [False, True], ids=["spawned", "preload"])
def test_user_group_and_umask(prefork_cmd, tmp_path, preload):  # noqa: F811
    if not _nobody_can_run_python():
        pytest.skip(f"user nobody cannot execute {sys.executable} here (test_group_and_umask covers the "
                    "rest)")
    answer = _whoami(prefork_cmd, tmp_path, "--user", "nobody", "--group", "nogroup", "--umask", "077",
                     "--preload" if preload else "--no-preload")
    assert answer["uid"] == pwd.getpwnam("nobody").pw_uid
    assert answer["gid"] == grp.getgrnam("nogroup").gr_gid
    assert answer["groups"] in ([], [answer["gid"]]) and answer["umask"] == 0o077


@ROOT_ONLY
@pytest.mark.parametrize("preload", [False, True], ids=["spawned", "preload"])
def test_group_and_umask(prefork_cmd, tmp_path, preload):  # noqa: F811
    """The user stays root (root may run this interpreter wherever it lives): group, supplementary
    groups and umask still change, by the same Popen keywords as --user's."""
    gid = grp.getgrnam("nogroup").gr_gid
    answer = _whoami(prefork_cmd, tmp_path, "--group", str(gid), "--umask", "0o027",
                     "--preload" if preload else "--no-preload")
    assert (answer["uid"], answer["gid"], answer["groups"], answer["umask"]) == (0, gid, [], 0o027)


@ROOT_ONLY
def test_without_the_flags_workers_stay_as_the_primary(prefork_cmd, tmp_path):  # noqa: F811
    answer = _whoami(prefork_cmd, tmp_path)
    assert (answer["uid"], answer["gid"]) == (0, os.getgid())


@pytest.mark.parametrize(("flags", "words"), [
    (["--user", "no-such-user-here"], "--user no-such-user-here: no such user"),
    (["--group", "no-such-group-here"], "--group no-such-group-here: no such group"),
    (["--user", "4000321"], "--user 4000321: uid 4000321 has no entry in the user database"),
], ids=["user", "group", "uid-without-group"])
def test_unknown_user_or_group_is_one_line_exit_2(flags, words):
    result = run_prefork(["serve", APP, "--bind", f"127.0.0.1:{free_port()}", *flags])
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prefork: error: ") and words in lines[0], result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="as root --user is allowed")
def test_user_when_not_root_is_one_line_exit_2():
    result = run_prefork(["serve", APP, "--bind", f"127.0.0.1:{free_port()}", "--user", "root"])
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--user root: only a primary started as root" in lines[0], result.stderr


@ROOT_ONLY
def test_a_primary_that_is_not_root_refuses_another_user():
    """As a process that dropped to nobody (forked here: nobody may not be able to start this
    interpreter, test_user_group_and_umask): another user or group is refused, its own is no change."""
    from prefork.launch import LaunchError, from_options

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = []
            for opts in ({"user": "root"}, {"group": "0"}, {"user": "nobody", "group": "nogroup"},
                         {"user": "nobody", "umask": 0o22}):
                try:
                    out.append(repr(from_options(opts)))
                except LaunchError as exc:
                    out.append(str(exc))
            os.write(write, "\n".join(out).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        lines = f.read().splitlines()
    os.waitpid(pid, 0)
    assert lines[0].startswith("--user root: only a primary started as root can run its workers as another "
                               "user"), lines
    assert lines[1].startswith("--group 0: only a primary started as root"), lines
    assert lines[2:] == ["None", "Launch(uid=None, gid=None, umask=18)"], lines
