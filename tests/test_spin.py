"""The readers' polling decision (spin.py) from real CPU placements: processes pinned with
os.sched_setaffinity, a real primary and worker, and a process moved while it runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from prefork import spin as spin_module
from prefork.spin import LOW, PROBE, RECHECK, Spin, placement_allows

CPUS = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs to place processes apart")


def test_a_primary_and_its_worker_on_one_cpu_never_poll_and_on_two_may(py) -> None:
    """Both ends decide, each on its reading thread: the primary's loop, the worker's channel threads."""
    a, b = CPUS[0], CPUS[1]
    result = py.run(f'''
        import os, time
        import prefork as cluster

        def pin(cpu):  # every thread of this process, as taskset -a does
            for tid in os.listdir("/proc/self/task"):
                try:
                    os.sched_setaffinity(int(tid), {{cpu}})
                except OSError:
                    pass

        def decision(channel):  # what a wait for an answer would get: seconds of polling
            channel.spin.check(time.monotonic())  # read the masks now (else once a second)
            return channel.spin.allowed(time.monotonic())

        if cluster.is_primary:
            pin({a})
            w = cluster.fork()

            def on_message(m, handle):
                where, worker_says = m
                print(where, "worker", worker_says > 0, "primary", decision(w._channel) > 0, flush=True)
                if where == "same":
                    w.send("move")
                else:
                    w.disconnect()

            w.on("message", on_message)
        else:
            me = cluster.worker

            def on_message(m, handle):
                pin({b})
                me.send(["apart", decision(me._channel)])

            me.on("message", on_message)
            pin({a})
            me.send(["same", decision(me._channel)])
    ''', timeout=30)
    assert result.returncode == 0, result
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines == ["same worker False primary False", "apart worker True primary True"], result


def test_a_worker_forked_by_the_template_watches_its_primary_not_its_parent(py) -> None:
    """Its parent is the fork template (template.py); `taskset -p` on the primary must be seen."""
    result = py.run("""
        import os
        import prefork as cluster

        def target():
            me = cluster.worker
            me.send([os.getppid(), me._channel.spin.peer])
            me.disconnect()

        if cluster.is_primary:
            cluster.setup_primary(start="fork", target=target)
            w = cluster.fork()
            w.on("message", lambda m, h: print("parent is primary", m[0] == os.getpid(),
                                               "peer is primary", m[1] == os.getpid(), flush=True))
    """, timeout=30)
    assert result.returncode == 0, result
    assert result.stdout.split() == "parent is primary False peer is primary True".split(), result


@pytest.fixture
def sleeper():
    """A real process to place: pinned to the first CPU, ended by pid."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.sched_setaffinity(proc.pid, {CPUS[0]})
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def in_thread_pinned(cpus: set[int], fn):  # noqa: ANN001, ANN202 - a test helper
    """fn() on a thread pinned to `cpus` (the decision reads the calling thread's mask)."""
    import threading

    box = []

    def run() -> None:
        os.sched_setaffinity(0, cpus)
        box.append(fn())

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    return box[0]


def test_a_peer_moved_by_taskset_is_seen_at_the_next_recheck(sleeper) -> None:
    a, b = CPUS[0], CPUS[1]

    def decide() -> list[float]:
        spin = Spin(50e-6, sleeper.pid)
        now = time.monotonic()
        got = [spin.allowed(now)]  # both on CPU a
        os.sched_setaffinity(sleeper.pid, {b})
        got.append(spin.allowed(now + RECHECK / 2))  # not read again yet
        got.append(spin.allowed(now + RECHECK))  # read again: apart
        got.append(placement_allows(sleeper.pid))
        return got

    assert in_thread_pinned({a}, decide) == [0.0, 0.0, 50e-6, True]


def test_polls_that_seldom_catch_the_answer_stop_and_are_probed_again(sleeper) -> None:
    os.sched_setaffinity(sleeper.pid, {CPUS[1]})

    def decide() -> tuple[int, int, float]:
        spin = Spin(50e-6, sleeper.pid)
        now = time.monotonic()
        assert spin.allowed(now) == 50e-6
        misses = 0
        while spin.score >= LOW:
            spin.outcome(False)
            misses += 1
        polls = sum(spin.allowed(now) > 0 for _ in range(10 * PROBE))  # one in PROBE probes
        while spin.score < LOW:  # the probes catch the answer again: polling comes back
            spin.outcome(True)
        return misses, polls, spin.allowed(now)

    misses, polls, after = in_thread_pinned({CPUS[0]}, decide)
    assert misses <= 10 and polls == 10 and after == 50e-6


def test_no_polling_when_turned_off_or_the_peer_is_gone(sleeper) -> None:
    os.sched_setaffinity(sleeper.pid, {CPUS[1]})
    assert in_thread_pinned({CPUS[0]}, lambda: Spin(0.0, sleeper.pid).allowed(time.monotonic())) == 0.0
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(30)
    # a peer that cannot be read: only our own mask can say no
    assert spin_module.cpus_of(gone.pid) is None
    assert in_thread_pinned({CPUS[0]}, lambda: placement_allows(gone.pid)) is False
    assert in_thread_pinned(set(CPUS[:2]), lambda: placement_allows(gone.pid)) is True
