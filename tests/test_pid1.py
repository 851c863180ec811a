"""The primary as an init process (src/prefork/reaper.py): PID 1 of a new pid namespace
(`unshare --pid --fork --mount-proc`, as a container runtime starts an entrypoint), and `--init`.

The app's `/orphan` route (tests/apps/ops.py) runs `sh -c "sleep S &"`: the shell exits at once and
its `sleep` is orphaned, so it reparents to PID 1 (or to the `--init` primary, a subreaper). When it
ends it is a zombie until that process reaps it; nobody else will. The test looks at the
namespace's processes from the host: the primary is the unshare process's child, and its children
are the workers and the reparented `sleep`s.
"""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import pytest
from cli_helpers import ctl_json, free_port, pid_alive
from conftest import children, wait_until
from wrapped import Wrapped

pytestmark = pytest.mark.timeout(120)
APP = "tests.apps.ops:app"


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, command name) of a host pid, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), data[data.index("(") + 1:data.rindex(")")]


def _kids(pid: int) -> dict[int, tuple[str, str]]:
    """Every child of `pid`, zombies included: {pid: (state, name)}."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _stat(int(entry))
            if found is not None and found[1] == pid:
                out[int(entry)] = (found[0], found[2])
    return out


def _unshare_works() -> str | None:
    if os.geteuid() != 0:
        return "a new pid namespace needs root here"
    try:
        result = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                                text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare cannot run: {exc}"
    if result.returncode != 0:
        return f"unshare --pid --fork --mount-proc fails here: {result.stderr.strip()}"
    return None


def _orphans(port: int, n: int, seconds: float) -> None:
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            response = client.get(f"http://127.0.0.1:{port}/orphan?s={seconds}")
            assert response.status_code == 200 and response.text.strip().isdigit(), response.text


def _check_reaped(primary: int, cmd: Wrapped) -> None:
    """The sleeps reparented to the primary; once they end, none stays a zombie."""
    assert wait_until(lambda: any(name == "sleep" for _, name in _kids(primary).values()), 10), \
        f"no orphaned sleep came to the primary (pid {primary}): {_kids(primary)}"
    assert wait_until(lambda: not [p for p, (_, name) in _kids(primary).items() if name == "sleep"], 20), \
        f"orphans left as zombies under the primary: {_kids(primary)}\n{cmd.output}"
    zombies = {p: k for p, k in _kids(primary).items() if k[0] == "Z"}
    assert not zombies or wait_until(lambda: not {p for p, k in _kids(primary).items() if k[0] == "Z"}, 10), \
        zombies


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_pid1_reaps_orphans_and_stops_with_exit_0(tmp_path, signame):
    why = _unshare_works()
    if why:
        pytest.skip(why)
    port = free_port()
    cmd = Wrapped(["unshare", "--pid", "--fork", "--mount-proc"],
                  ["serve", APP, "--workers", "2", "--bind", f"127.0.0.1:{port}",
                   "--control", str(tmp_path / "ctl.sock")])
    try:
        cmd.wait_ready(30)
        cmd.expect(r"^  pid +1$")  # the banner: the primary is PID 1 of its namespace
        assert wait_until(lambda: len(children(cmd.proc.pid)) == 1, 10)
        (primary,) = children(cmd.proc.pid)
        cmd.worker_pids.update(children(primary))
        _orphans(port, 6, 1.0)  # each sleeps 1 s: long enough to be seen as the primary's child
        _check_reaped(primary, cmd)
        os.kill(primary, getattr(signal, signame))
        assert cmd.finish(30) == 0, cmd.output  # unshare exits with its child's code
        assert "stopped" in cmd.output.splitlines()[-1], cmd.output
    finally:
        cmd.kill_all()
    for pid in cmd.worker_pids:
        assert not pid_alive(pid)


@pytest.mark.parametrize("preload", [False, True], ids=["spawn", "preload"])
def test_init_makes_the_primary_reap_orphans_without_a_namespace(tmp_path, preload):
    """With --preload the workers are the fork template's children: their orphans still come to the
    primary, the nearest subreaper."""
    port = free_port()
    cmd = Wrapped([], ["serve", APP, "--workers", "1", "--init", "--bind", f"127.0.0.1:{port}",
                       "--control", str(tmp_path / "ctl.sock"), *(["--preload"] if preload else [])])
    try:
        cmd.wait_ready(30)
        primary = cmd.proc.pid
        cmd.worker_pids.update(children(primary))
        _orphans(port, 3, 1.0)  # without --init they would go to the host's PID 1 (subreaper: us)
        _check_reaped(primary, cmd)
        os.kill(primary, signal.SIGTERM)
        assert cmd.finish(30) == 0, cmd.output
    finally:
        cmd.kill_all()


@pytest.mark.parametrize("preload", ["--preload", "--no-preload"])
def test_workers_statuses_are_not_stolen(tmp_path, preload):
    """The reaper leaves the workers (and the template, whose workers' statuses it reports) to their
    owners: a killed worker is still reported with its signal and replaced (a stolen status would
    read as 'code 0', or never arrive)."""
    port = free_port()
    control = str(tmp_path / "ctl.sock")
    cmd = Wrapped([], ["serve", APP, "--workers", "2", "--init", "--bind", f"127.0.0.1:{port}",
                       "--control", control, preload])
    current = lambda: [w["pid"] for w in ctl_json(control)["workers"]]  # noqa: E731
    try:
        cmd.wait_ready(30)
        primary = cmd.proc.pid
        workers = current()
        cmd.worker_pids.update(workers, children(primary))
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
            cmd.expect(rf"\(pid {pid}\) died \(signal SIGKILL\)", 20)
        fresh = lambda: [p for p in current() if p not in workers]  # noqa: E731
        assert wait_until(lambda: len(fresh()) == 2, 20), cmd.output
        cmd.worker_pids.update(current(), children(primary))
        os.kill(primary, signal.SIGTERM)
        assert cmd.finish(30) == 0, cmd.output
    finally:
        cmd.kill_all()
