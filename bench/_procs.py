"""What bench/deploys.py reads about the servers it runs: process trees and memory from /proc, a
plain HTTP probe on 127.0.0.1, and a server whose output lines are timestamped as they arrive.
Linux only, standard library only."""

from __future__ import annotations

import errno
import os
import re
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from _harness import stop_process

MB = 1024 * 1024


# -- /proc -----------------------------------------------------------------------------------------


def parse_rollup(text: str) -> dict[str, int]:
    """/proc/PID/smaps_rollup -> {"Rss": bytes, "Pss": ..., "uss": Private_Clean + Private_Dirty}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+):\s+(\d+) kB", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * 1024
    out["uss"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


def rollup(pid: int) -> dict[str, int]:
    return parse_rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())


def _ppid(stat: str) -> int:
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, ppid


def descendants(root: int) -> list[int]:
    """Every live process below `root` (children, their children...), by one scan of /proc."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                kids.setdefault(_ppid(Path(f"/proc/{entry}/stat").read_text()), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass  # gone meanwhile
    out, todo = [], [root]
    while todo:
        for kid in kids.get(todo.pop(), []):
            out.append(kid)
            todo.append(kid)
    return out


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def gone(pid: int) -> bool:
    """Exited (a zombie counts: it runs no code and holds no socket)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


# -- HTTP ------------------------------------------------------------------------------------------


def get(port: int, timeout: float = 2.0) -> bytes | None:
    """One GET / on a new connection: the body of a 200 answer, else None (refused, reset, other)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    return body if re.match(rb"HTTP/1\.[01] 200 ", head) else None


def until_ok(port: int, deadline: float, every: float = 0.001) -> float:
    """Poll GET / every `every` s until one succeeds: the monotonic time it did (one at a time)."""
    while time.monotonic() < deadline:
        if get(port) is not None:
            return time.monotonic()
        time.sleep(every)
    raise TimeoutError(f"127.0.0.1:{port} did not answer 200 in time")


REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def until_served(port: int, deadline: float, every: float = 0.001, most: int = 4,
                 stale: float = 1.0) -> float:
    """A new connection with GET / every `every` s while fewer than `most` wait for an answer, until
    one gets a 200 status line: the monotonic time it did. A probe unanswered after `stale` s is
    dropped: a connection a server accepted while it had no worker (Node's primary hands one to the
    worker that just died) must not hold the next ones back. `most` stays small because a server
    that keeps its socket open (prefork, gunicorn) queues them all, and its new worker answers the
    first only after it accepted the batch."""
    sel = selectors.DefaultSelector()
    probes: dict[socket.socket, tuple[float, bytes | None]] = {}  # None: the request is not sent yet

    def drop(s: socket.socket) -> None:
        sel.unregister(s)
        del probes[s]
        s.close()

    next_at = 0.0
    try:
        while (now := time.monotonic()) < deadline:
            for s in [s for s, (t, _) in probes.items() if now - t > stale]:
                drop(s)
            if now >= next_at and len(probes) < most:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                if s.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS):
                    probes[s] = (now, None)
                    sel.register(s, selectors.EVENT_WRITE)
                else:
                    s.close()
                next_at = now + every
            for key, _ in sel.select(max(0.0, next_at - time.monotonic())):
                s = key.fileobj  # type: ignore[assignment]
                t, data = probes[s]
                try:
                    if data is None:
                        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                            raise ConnectionRefusedError
                        s.sendall(REQUEST)
                        probes[s] = (t, b"")
                        sel.modify(s, selectors.EVENT_READ)
                        continue
                    chunk = s.recv(65536)
                except OSError:
                    drop(s)
                    continue
                data += chunk
                probes[s] = (t, data)
                if not chunk or b"\r\n" in data:
                    if re.match(rb"HTTP/1\.[01] 200 ", data):
                        return time.monotonic()
                    drop(s)
    finally:
        for s in list(probes):
            s.close()
        sel.close()
    raise TimeoutError(f"127.0.0.1:{port} did not answer 200 in time")


# -- a server under test ---------------------------------------------------------------------------


class Server:
    """A server in its own session, its stdout and stderr read by a thread that stamps each line
    with time.monotonic() as it arrives (a log line's own clock is wall time, to the ms)."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], port: int, cwd: str,
                 control: str | None = None) -> None:
        self.name, self.port, self.control = name, port, control
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self.lines.append((time.monotonic(), line.decode(errors="replace").rstrip()))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_line(self, pattern: str, after: float, timeout: float) -> tuple[float, re.Match[str]]:
        """The first line matching `pattern` that arrived after `after`: (its arrival, the match)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            lines = self.lines[seen:]
            seen += len(lines)
            for t, line in lines:
                m = re.search(pattern, line)
                if m and t >= after:
                    return t, m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(line for _, line in self.lines[-15:])
                raise TimeoutError(f"{self.name}: no line matching {pattern!r}; last lines:\n{tail}")
            time.sleep(0.0005)

    def workers(self) -> list[int]:
        """The worker pids: prefork's from its control socket (the tree also holds its template),
        the others' are the primary's children."""
        if self.control is None:
            return children(self.pid)
        from prefork.control import request

        status = request(self.control, {"cmd": "status"}, 10.0)["status"]
        return [w["pid"] for w in status["workers"] if w.get("state") == "ready"]

    def wait_workers(self, n: int, timeout: float = 30.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            pids = [p for p in self.workers() if not gone(p)]
            if len(pids) == n:
                return pids
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {len(pids)} workers, not {n}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc, timeout=10.0)
        self._reader.join(timeout=5.0)
