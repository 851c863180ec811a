"""`--workers auto` follows what the process may use: the affinity mask (`taskset`) and the cgroup CPU
quota (src/prefork/cpus.py); WEB_CONCURRENCY sets the count as with gunicorn and uvicorn. The banner
and `ctl status` say how the number was found.

The cgroup tests make a real v1 cpu cgroup (root, on a host that mounts /sys/fs/cgroup/cpu) and start
prefork inside it; elsewhere they skip and say why. The unit tests read folder trees in tmp_path.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest
from cli_helpers import ctl_json, free_port, prefork_cmd, run_prefork  # noqa: F401
from wrapped import Wrapped

from prefork import cpus

pytestmark = pytest.mark.timeout(90)
CPU_V1 = Path("/sys/fs/cgroup/cpu")


def _serve_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["serve", "tests.apps.hello:asgi", "--bind", f"127.0.0.1:{free_port()}",
            "--control", str(tmp_path / "ctl.sock"), *extra]


def _count_and_how(cmd, control: str) -> tuple[int, str]:
    cmd.wait_ready()
    status = ctl_json(control)
    cmd.worker_pids.update(w["pid"] for w in status["workers"])
    return len(status["workers"]), str(status["workers_how"])


def test_taskset_gives_one_worker(tmp_path):
    """`taskset -c 0 prefork serve ...`: 1 worker, and the banner and status say it is the affinity."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs or more, so that one CPU is fewer than the host's")
    if shutil.which("taskset") is None:
        pytest.skip("taskset is not installed")
    _run_wrapped(tmp_path, ["taskset", "-c", "0"], expect_workers=1,
                 expect_how=f"1 (affinity 1 of {os.cpu_count()} CPUs)")


def test_web_concurrency_sets_the_count(prefork_cmd, tmp_path):  # noqa: F811
    args = _serve_args(tmp_path)
    cmd = prefork_cmd(*args, env={"WEB_CONCURRENCY": "3"})
    n, how = _count_and_how(cmd, args[-1])
    assert n == 3, cmd.output
    assert how == "3", how
    assert re.search(r"^  workers +3$", cmd.output, re.M), cmd.output


@pytest.mark.parametrize("value", ["three", "0", "-2", "2.5", "99999"])
def test_bad_web_concurrency_is_one_line_and_exit_2(tmp_path, value):
    result = run_prefork(_serve_args(tmp_path), env={"WEB_CONCURRENCY": value})
    assert result.returncode == 2, result
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "WEB_CONCURRENCY" in lines[0], lines
    assert "Traceback" not in result.stderr


# -- a real cgroup quota ---------------------------------------------------------------------------


def _make_cgroup(quota_us: int, period_us: int = 100_000) -> Path:
    if os.geteuid() != 0:
        pytest.skip("making a cgroup needs root")
    if not (CPU_V1 / "cpu.cfs_quota_us").exists():
        pytest.skip(f"no cgroup v1 cpu controller mounted at {CPU_V1} (cgroup v2 only, or none)")
    folder = CPU_V1 / f"prefork-test-{uuid.uuid4().hex[:12]}"
    try:
        folder.mkdir()
        (folder / "cpu.cfs_period_us").write_text(str(period_us))
        (folder / "cpu.cfs_quota_us").write_text(str(quota_us))
    except OSError as exc:
        if folder.exists():
            _remove_cgroup(folder)
        pytest.skip(f"cannot make a cpu cgroup here: {exc}")
    return folder


def _remove_cgroup(folder: Path) -> None:
    """rmdir once no process is left in it (an exited process may take a moment to leave)."""
    deadline = time.monotonic() + 15
    while True:
        try:
            folder.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _run_wrapped(tmp_path: Path, prefix: list[str], expect_workers: int, expect_how: str) -> None:
    args = _serve_args(tmp_path)
    cmd = Wrapped(prefix, args)
    try:
        n, how = _count_and_how(cmd, args[-1])
        assert n == expect_workers, cmd.output
        assert how == expect_how, (how, cmd.output)
        assert re.search(rf"^  workers +{re.escape(expect_how)}$", cmd.output, re.M), cmd.output  # banner
        cmd.proc.terminate()
        assert cmd.finish() == 0, cmd.output
    finally:
        cmd.kill_all()


@pytest.mark.parametrize(("quota_us", "workers"), [(150_000, 2), (50_000, 1)])
def test_cgroup_quota_caps_the_count(tmp_path, quota_us, workers):
    host = os.cpu_count() or 1
    if host < 2:
        pytest.skip("needs 2 CPUs or more, so that a quota can be fewer than the host's")
    folder = _make_cgroup(quota_us)
    try:
        enter = f"echo $$ > {folder}/cgroup.procs && exec \"$@\""
        _run_wrapped(tmp_path, ["sh", "-c", enter, "sh"], expect_workers=workers,
                     expect_how=f"{workers} (cgroup quota {quota_us / 100_000:.1f} of {host} CPUs)")
    finally:
        _remove_cgroup(folder)


# -- cpus.cgroup_quota against folder trees --------------------------------------------------------


def _tree(tmp_path: Path, proc_lines: str, files: dict[str, str]) -> tuple[str, str]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_lines)
    return str(root), str(proc)


def test_v2_max_is_no_limit(tmp_path):
    root, proc = _tree(tmp_path, "0::/app\n", {"app/cpu.max": "max 100000\n"})
    assert cpus.cgroup_quota(root, proc) is None


def test_v2_quota(tmp_path):
    root, proc = _tree(tmp_path, "0::/app\n", {"app/cpu.max": "150000 100000\n"})
    assert cpus.cgroup_quota(root, proc) == 1.5


def test_v2_limit_on_a_parent(tmp_path):
    root, proc = _tree(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "kubepods/cpu.max": "max 100000\n", "kubepods/pod1/cpu.max": "200000 100000\n",
        "kubepods/pod1/ctr/cpu.max": "max 100000\n"})
    assert cpus.cgroup_quota(root, proc) == 2.0


def test_v2_smallest_limit_wins(tmp_path):
    root, proc = _tree(tmp_path, "0::/a/b\n", {"a/cpu.max": "50000 100000\n",
                                                "a/b/cpu.max": "300000 100000\n"})
    assert cpus.cgroup_quota(root, proc) == 0.5


def test_v2_path_missing_in_a_container_reads_the_mount(tmp_path):
    # inside a container /proc/self/cgroup names the host's path, and the container's root is the mount
    root, proc = _tree(tmp_path, "0::/docker/abc\n", {"cpu.max": "250000 100000\n"})
    assert cpus.cgroup_quota(root, proc) == 2.5


def test_v1_files(tmp_path):
    lines = "3:cpuset:/\n2:cpu,cpuacct:/job\n0::/\n"
    root, proc = _tree(tmp_path, lines, {"cpu,cpuacct/job/cpu.cfs_quota_us": "300000\n",
                                         "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"})
    assert cpus.cgroup_quota(root, proc) == 3.0


def test_v1_no_limit_and_limit_on_a_parent(tmp_path):
    lines = "1:cpu:/outer/inner\n"
    files = {"cpu/outer/inner/cpu.cfs_quota_us": "-1\n", "cpu/outer/inner/cpu.cfs_period_us": "100000\n"}
    root, proc = _tree(tmp_path, lines, files)
    assert cpus.cgroup_quota(root, proc) is None
    root, proc = _tree(tmp_path, lines, {**files, "cpu/outer/cpu.cfs_quota_us": "50000\n",
                                         "cpu/outer/cpu.cfs_period_us": "100000\n"})
    assert cpus.cgroup_quota(root, proc) == 0.5


def test_garbage_is_no_limit(tmp_path):
    root, proc = _tree(tmp_path, "0::/x\n1:cpu:/x\n", {
        "x/cpu.max": "lots 100000\n", "cpu/x/cpu.cfs_quota_us": "abc\n", "cpu/x/cpu.cfs_period_us": "0\n"})
    assert cpus.cgroup_quota(root, proc) is None
    assert cpus.cgroup_quota(root, str(tmp_path / "missing")) is None


def test_usable_says_how(tmp_path):
    host = os.cpu_count() or 1
    mask = len(os.sched_getaffinity(0))
    root, proc = _tree(tmp_path, "0::/a\n", {"a/cpu.max": "50000 100000\n"})
    found = cpus.usable(root, proc)
    assert found == 1 and found.how.startswith(f"1 (cgroup quota 0.5 of {host} CPUs")
    root, proc = _tree(tmp_path, "0::/b\n", {"b/cpu.max": "max 100000\n"})
    found = cpus.usable(root, proc)
    assert found == mask and "cgroup" not in found.how
