"""Workers of `setup_primary(start="fork")` are forked by a single-threaded template (template.py).

Forking the primary itself, a process with threads, gives the child every lock as it was at that
instant: here a user's thread is blocked writing to stderr (a full pipe), holding the stderr
buffer's lock, and a worker forked from the primary then hangs for good on its first print.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from conftest import PYTHON, end_processes, pid_alive, wait_until

SCRIPT = r"""
import os, sys, threading, time
import prefork as cluster

def target():
    print("worker speaks", file=sys.stderr, flush=True)  # needs the stderr buffer's lock
    cluster.worker.send(os.getppid())
    cluster.worker.on("message", lambda message, handle: None)

cluster.setup_primary(start="fork", target=target)
threading.Thread(target=lambda: sys.stderr.write("x" * (4 << 20)), daemon=True).start()
time.sleep(0.5)  # that thread is now blocked in write(), holding the lock, until stderr is read
workers = [cluster.fork() for _ in range(3)]
print("forked", " ".join(str(w.process.pid) for w in workers), flush=True)

@cluster.on("message")
def up(worker, parent, handle):
    print("up", worker.id, "parent", parent, flush=True)
    worker.kill()
"""


def test_a_thread_holding_a_lock_at_fork_time_does_not_hang_the_workers(tmp_path):
    script = tmp_path / "main.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([PYTHON, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    pids: list[int] = []
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert line.startswith("forked"), line
        pids = [int(p) for p in line.split()[1:]]
        drained = threading.Thread(target=proc.stderr.read, daemon=True)  # the writer goes on now
        drained.start()
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        ups = [ln for ln in out.splitlines() if ln.startswith("up ")]
        assert len(ups) == 3, out
        parents = {ln.split()[-1] for ln in ups}
        assert parents != {str(proc.pid)}, f"forked by the primary itself: {out}"
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), 5)
    finally:
        end_processes(proc, pids)


def test_no_fork_with_threads_warning_in_a_template_worker(py):
    """Python 3.12+ warns when a process with threads forks; the template has one thread."""
    if sys.version_info < (3, 12):
        import pytest

        pytest.skip("Python 3.12+ warns about forking with threads; this Python does not")
    result = py.run("""
        import warnings
        warnings.simplefilter("always")
        import prefork as cluster
        def target():
            cluster.worker.disconnect()
        cluster.setup_primary(start="fork", target=target)
        cluster.fork()
    """, timeout=20)
    assert result.returncode == 0, result
    assert "multi-threaded" not in result.stderr, result.stderr


def test_the_template_goes_with_the_primary(py):
    script = py.spawn("""
        import os, threading
        import prefork as cluster
        def target():
            threading.Event().wait()
        cluster.setup_primary(start="fork", target=target)
        w = cluster.fork()
        print("worker", w.process.pid, "template", cluster.settings and os.getppid(), flush=True)
        threading.Event().wait()
    """)
    pid = int(script.expect(r"worker (\d+)")[1])
    script.track(pid)
    template = _parent(pid)
    script.track(template)
    assert template != script.pid
    os.kill(script.pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(template) and not pid_alive(pid), 10)
    time.sleep(0.1)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return int(data[data.rindex(")") + 2:].split()[1])
