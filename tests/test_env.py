"""The environment between a primary, its workers and their own children."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cli_helpers import PREFORK, clean_env


def test_a_workers_children_inherit_no_internal_variable(py):
    """A prefork app started from a worker must start as a primary with a clean environment
    (an inherited PREFORK_SUPERVISED made it lose its own workers' tracebacks)."""
    result = py.run("""
        import json, os, subprocess, sys
        import prefork as cluster
        cluster.scheduling_policy = cluster.SCHED_NONE
        if cluster.is_primary:
            sup = cluster.supervise(1)
            cluster.on("message", lambda worker, message, handle: (print("child env", message, flush=True),
                                                                   sup.stop()))
            sys.exit(sup.wait())
        else:
            code = ("import json, os; "
                    "print(json.dumps(sorted(k for k in os.environ if k.startswith('PREFORK_'))))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
            cluster.worker.send(out.strip())
            cluster.listen(("127.0.0.1", 0))
            import threading
            threading.Event().wait()
    """, env={"PREFORK_USER_SETTING": "kept"}, timeout=20)
    assert result.returncode == 0, result
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("child env"))
    assert json.loads(line[len("child env "):]) == ["PREFORK_USER_SETTING"], line


BAD_ENV = [
    ({"PREFORK_WORKER_ID": "1"}, "PREFORK_WORKER_ID"),
    ({"PREFORK_WORKER_ID": "1", "PREFORK_CHANNEL_FD": "0"}, "PREFORK_WORKER_ID"),
    ({"PREFORK_SCHED_POLICY": "bogus"}, "PREFORK_SCHED_POLICY"),
    ({"PREFORK_IPC_SPIN_US": "abc"}, "PREFORK_IPC_SPIN_US"),
]


@pytest.mark.parametrize(("env", "named"), BAD_ENV)
@pytest.mark.parametrize("how", ["import", "serve"])
def test_bad_environment_is_one_line_and_exit_2(env, named, how, tmp_path):
    argv = [sys.executable, "-c", "import prefork"] if how == "import" else \
        [PREFORK, "serve", "hello:asgi", "--bind", "127.0.0.1:0", "--control", str(tmp_path / "c.sock")]
    result = subprocess.run(argv, env=clean_env(env), capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL, cwd=str(tmp_path))
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in result.stderr, result.stderr
