"""The seed's HTTP examples, run as a user runs them (`.venv/bin/python examples/NAME.py`, env PORT).

Each test starts the example in its own process, talks HTTP to it on 127.0.0.1, stops it the way a
user would (Ctrl-C or SIGTERM to the primary) and checks that no process of it is left.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time

import pytest
from cli_helpers import free_port
from conftest import ROOT, children, pid_alive, wait_until

EXAMPLES = ROOT / "examples"
CPUS = os.cpu_count() or 1


def _get(port: int, timeout: float = 10) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def _get_when_up(port: int) -> tuple[int, str]:
    deadline = time.monotonic() + 10
    while True:
        try:
            return _get(port)
        except (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _start(py, name: str):
    port = free_port()
    script = py.spawn(EXAMPLES / f"{name}.py", env={"PORT": str(port)}, cwd=ROOT)
    return script, port


def _stop(script, sig: str, workers: set[int]) -> None:
    script.track(*workers)
    script.signal(sig)
    script.finish(timeout=10)
    assert wait_until(lambda: not any(pid_alive(p) for p in workers), 10), \
        [p for p in workers if pid_alive(p)]
    assert not children(script.pid)


def _lines(script, pattern: str, count: int, timeout: float = 15) -> None:
    import re

    regex = re.compile(pattern)
    if not wait_until(lambda: sum(bool(regex.search(x)) for x in script.lines()) >= count, timeout):
        pytest.fail(f"{count} lines {pattern!r} expected\n"
                    f"--- stdout\n{script.stdout}--- stderr\n{script.stderr}")


def test_hello_cluster(py):
    script, port = _start(py, "hello_cluster")
    _lines(script, r"^start$", CPUS)  # each worker prints "start"
    assert _get_when_up(port) == (200, "hello world\n")
    results = [_get(port) for _ in range(20)]
    assert results == [(200, "hello world\n")] * 20
    workers = children(script.pid)
    assert len(workers) == CPUS
    _stop(script, "SIGINT", workers)


def test_online_exit_respawns(py):
    script, port = _start(py, "online_exit")
    script.expect(rf"^Master cluster setting up {CPUS} workers\.\.\.$")
    _lines(script, r"^Worker \d+ is online$", CPUS)
    _lines(script, r"^start$", CPUS)
    assert "worker id =  1" in script.stdout
    assert _get_when_up(port) == (200, "hello world\n")
    victim = int(script.expect(r"^Worker (\d+) is online$")[1])
    os.kill(victim, signal.SIGKILL)
    script.expect(rf"^Worker {victim} died with code: None, and signal: SIGKILL$")
    script.expect(r"^Starting a new worker$")
    _lines(script, r"^Worker \d+ is online$", CPUS + 1)
    _lines(script, r"^start$", CPUS + 1)
    assert [_get(port) for _ in range(10)] == [(200, "hello world\n")] * 10
    workers = children(script.pid)
    assert len(workers) == CPUS and victim not in workers
    _stop(script, "SIGINT", workers)


def test_master_reload_on_sighup(py):
    script, port = _start(py, "master_reload")
    script.expect(r"^started master with \d+$")
    first = int(script.expect(r"^worker 1 started with (\d+)$")[1])
    status, body = _get_when_up(port)
    assert status == 200 and body.startswith("hello from worker 1 ")

    failures: list[BaseException] = []
    answers: list[str] = []
    stop = threading.Event()

    def hammer() -> None:  # requests all through the reload: none may fail
        while not stop.is_set():
            try:
                answers.append(_get(port)[1])
            except BaseException as exc:  # noqa: BLE001 - asserted below
                failures.append(exc)

    clients = [threading.Thread(target=hammer) for _ in range(3)]
    for t in clients:
        t.start()
    time.sleep(0.3)
    script.signal("SIGHUP")
    script.expect(r"^Reloading\.\.\.$")
    second = int(script.expect(r"^worker 2 started with (\d+)$")[1])
    script.track(first, second)
    assert wait_until(lambda: not pid_alive(first), 10)  # the old worker was stopped...
    script.expect(r"^worker 1 stopped$")  # ...gracefully: its serve_forever() returned
    time.sleep(0.3)
    stop.set()
    for t in clients:
        t.join(15)
    assert not failures, failures[:3]
    assert any(a.startswith("hello from worker 1 ") for a in answers)
    assert answers[-1].startswith("hello from worker 2 ")
    assert children(script.pid) == {second}
    _stop(script, "SIGTERM", {second})


def test_restart_workers(py):
    script, port = _start(py, "restart_workers")
    _lines(script, r"^worker \d+ started with \d+$", CPUS)
    assert _get_when_up(port)[0] == 200
    old = children(script.pid)
    assert len(old) == CPUS
    script.track(*old)
    script.signal("SIGUSR2")
    _lines(script, r"^worker \d+ shutting down$", CPUS)
    _lines(script, r"^Worker \d+ died with code: 0, and signal: None$", CPUS)
    _lines(script, r"^worker \d+ started with \d+$", 2 * CPUS)  # every one replaced
    assert wait_until(lambda: not any(pid_alive(p) for p in old), 10)
    status, body = _get_when_up(port)
    assert status == 200 and int(body.split()[3]) > CPUS  # served by a new worker
    new = children(script.pid)
    assert len(new) == CPUS and not new & old
    _stop(script, "SIGTERM", new)
