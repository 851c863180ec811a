"""least_conn under uneven work, with real processes: a worker busy in a slow request (it neither
reads its hand-off link nor reports) gets at most one more connection; when every worker is busy,
new connections wait in the primary and go to the first worker that is free again, not into a
queue behind a slow request (src/prefork/policies/least_conn.py)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

# Each worker serves one connection at a time: "sleep S" blocks the whole worker for S seconds
# (a slow request), "id" answers at once. Closes are reported, as prefork's servers do.
BUSY = r"""
import time
import prefork as cluster

cluster.scheduling_policy = cluster.SCHED_LEAST_CONN
if cluster.is_primary:
    cluster.on("listening", lambda w, a: print("listening", w.id, a.port, flush=True))
    cluster.fork()
    cluster.fork()
else:
    listener = cluster.listen(("127.0.0.1", 0))
    while True:
        conn, _ = listener.accept()
        line = conn.makefile().readline().split()
        if line and line[0] == "sleep":
            time.sleep(float(line[1]))
        conn.sendall(b"%d %f" % (cluster.worker.id, time.monotonic()))
        conn.close()
        listener.report_finished(1)
"""


def ask(port: int, line: str, out: dict[str, str], key: str) -> threading.Thread:
    def run() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(line.encode() + b"\n")
            out[key] = sock.recv(100).decode()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(60)
def test_when_every_worker_is_busy_new_connections_go_to_the_first_one_free(py):
    script = py.spawn(BUSY)
    ports = {script.expect(r"listening (\d+) (\d+)", start=i)[2] for i in range(2)}
    port = int(ports.pop())
    answers: dict[str, str] = {}
    long_one = ask(port, "sleep 4", answers, "long")  # one worker busy for 4 s
    time.sleep(0.2)
    short_one = ask(port, "sleep 1", answers, "short")  # the other for 1 s
    time.sleep(0.3)  # both busy, and silent for far longer than STALL_S
    threads = []
    for i in range(8):
        threads.append(ask(port, "id", answers, f"id{i}"))
        time.sleep(0.02)
    for t in [short_one, *threads]:
        t.join(30)
    long_one.join(30)
    assert len(answers) == 10, answers
    slow_worker = answers["long"].split()[0]
    free_at = float(answers["short"].split()[1])
    behind = [k for k in answers if k.startswith("id") and answers[k].split()[0] == slow_worker]
    # At most one went to each busy worker before it was seen not to read; the rest waited in the
    # primary and went to the worker free after 1 s. Round robin would queue half behind the 4 s.
    assert len(behind) <= 1, answers
    served_early = [k for k in answers if k.startswith("id") and float(answers[k].split()[1]) < free_at + 1.5]
    assert len(served_early) >= 7, answers
    script.signal("SIGINT")
    script.finish()
