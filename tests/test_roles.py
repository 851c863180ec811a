"""Roles come from PREFORK_WORKER_ID, as Node's come from NODE_UNIQUE_ID (real processes)."""

from __future__ import annotations

import json

import pytest
from conftest import PYTHON


def test_plain_process_is_primary(py):
    result = py.run("""
        import json, prefork
        print(json.dumps([prefork.is_primary, prefork.is_master, prefork.is_worker,
                          prefork.isMaster, prefork.isWorker, prefork.worker]))
    """)
    assert result.returncode == 0, result
    assert json.loads(result.stdout) == [True, True, False, True, False, None]


def test_forked_worker_is_worker_and_primary_is_primary(py):
    result = py.run("""
        import os, json, prefork as cluster
        role = [cluster.is_primary, cluster.is_master, cluster.is_worker]
        if cluster.is_primary:
            print("primary", json.dumps(role))
            cluster.fork()
        else:
            print("worker", json.dumps(role), cluster.worker.id,
                  "PREFORK_WORKER_ID" in os.environ)
    """)
    assert result.returncode == 0, result
    assert "primary [true, true, false]" in result.stdout
    # The id is known to the worker, and the variable is cleared so its children are not workers.
    assert "worker [false, false, true] 1 False" in result.stdout


def test_child_of_a_worker_is_a_primary(py):
    """A worker's own subprocess running Python that imports prefork must be a primary, not a worker."""
    result = py.run(f"""
        import json, subprocess, prefork as cluster
        if cluster.is_primary:
            cluster.fork()
        else:
            out = subprocess.run(
                [{PYTHON!r}, "-c",
                 "import json, os, prefork as c; "
                 "print(json.dumps([c.is_primary, c.is_worker, 'PREFORK_WORKER_ID' in os.environ]))"],
                capture_output=True, text=True, timeout=10)
            print("grandchild", out.stdout.strip(), out.returncode)
    """)
    assert result.returncode == 0, result
    assert "grandchild [true, false, false] 0" in result.stdout, result


@pytest.mark.parametrize("fd", ["987", None, "x"])
def test_env_variable_without_channel_fails_clearly(py, fd):
    """PREFORK_WORKER_ID set by hand makes a worker; with no channel it must fail clearly,
    not hang or pretend to be a primary."""
    result = py.run("""
        import prefork
        print("is_worker", prefork.is_worker)
    """, env={"PREFORK_WORKER_ID": "7", "PREFORK_CHANNEL_FD": fd}, timeout=10)
    assert "is_worker" not in result.stdout
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and "fork()" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
