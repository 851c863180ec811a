"""Open-loop HTTP load at a fixed rate, coordinated omission corrected: bench/latency.py's client.

    .venv/bin/python bench/openloop.py http://127.0.0.1:8000/ --rate 20000 --seconds 5 [--connections 64]

Why not only bench/openloop.lua: wrk's Lua callbacks are not told which connection they serve, so
that script needs one connection per wrk thread, and its two thread wake-ups per request cost about
40-60 us of CPU per request on this 2-CPU machine: at half a fast peer's maximum (about 29,000
req/s) it could not hold the rate beside the server, where this client does. Here each process runs
one epoll loop over its connections and wakes once for all the requests that fall due together.

Requests fall due on a fixed schedule, --rate in total, spread over --procs processes (process i
offset by i/procs of its interval). A due request goes out on any idle connection (a pool, as a real
client's); when none is idle it waits, and its latency still counts from its intended send time, so a
stall shows in the figures. Waking on time: a timerfd armed at the next due time (ns resolution; an
epoll timeout has whole milliseconds). Prints one line, "openloop {json}", as bench/openloop.lua.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import json
import math
import os
import select
import socket
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit

LOG_STEP = math.log(1.01)
CLOCK_MONOTONIC, TFD_TIMER_ABSTIME, TFD_NONBLOCK_CLOEXEC = 1, 1, 0o4000 | 0o2000000


def bucket(us: float) -> int:
    """1 us buckets below 1 ms, then buckets 1% wide (as bench/openloop.lua)."""
    return int(us) if us < 1000 else 1000 + int(math.log(us / 1000) / LOG_STEP)


def bucket_value(i: int) -> float:
    return float(i + 1) if i < 1000 else 1000 * math.exp((i - 999) * LOG_STEP)


def percentiles(hist: dict[int, int]) -> dict[str, float]:
    total = sum(hist.values())
    out: dict[str, float] = {"n": total, "max": bucket_value(max(hist)) if hist else 0.0}
    wanted = [("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9), ("p9999", 99.99)]
    seen, w = 0, 0
    for i in sorted(hist):
        seen += hist[i]
        while w < len(wanted) and seen >= wanted[w][1] / 100 * total:
            out[wanted[w][0]] = bucket_value(i)
            w += 1
    return out


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _connect(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setblocking(False)
    return s


def _complete(buf: bytes) -> tuple[int, int] | None:
    """(status, length) of the first whole response in buf, or None (Content-Length or chunked)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].lower()
    status = int(head[9:12])
    i = head.find(b"\r\ncontent-length:")
    if i >= 0:
        j = head.find(b"\r\n", i + 2)
        size = end + 4 + int(head[i + 17 : j if j >= 0 else len(head)])
        return (status, size) if len(buf) >= size else None
    if b"chunked" in head:
        k = buf.find(b"\r\n0\r\n\r\n", end)
        return (status, k + 7) if k >= 0 else None
    return status, end + 4


def worker(url: str, rate: float, t0: float, seconds: float, conns: int) -> dict[str, Any]:
    """One process: `rate` req/s from monotonic time t0 for `seconds` over `conns` connections."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    libc = ctypes.CDLL(None, use_errno=True)
    tfd = libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK_CLOEXEC)
    spec = _Itimerspec()
    ep = select.epoll()
    ep.register(tfd, select.EPOLLIN)
    socks: dict[int, socket.socket] = {}
    for _ in range(conns):
        s = _connect(host, port)
        socks[s.fileno()] = s
        ep.register(s.fileno(), select.EPOLLIN)
    idle = list(socks)
    bufs = dict.fromkeys(socks, b"")
    inflight: dict[int, tuple[float, float]] = {}
    lat: dict[int, int] = collections.defaultdict(int)
    svc: dict[int, int] = collections.defaultdict(int)
    late: dict[int, int] = collections.defaultdict(int)
    pending: collections.deque[float] = collections.deque()
    interval, n, armed, end = 1.0 / rate, 0, 0.0, t0 + seconds
    responses = errors = 0
    last = worst = 0.0
    monotonic = time.monotonic
    while True:
        now = monotonic()
        if now >= end:
            break
        while t0 + n * interval <= now:
            pending.append(t0 + n * interval)
            n += 1
        while pending and idle:
            fd = idle.pop()
            due = pending.popleft()
            sent = monotonic()
            try:
                socks[fd].send(request)
            except OSError:
                errors += 1
                continue  # a broken connection leaves the pool; its slot is counted as an error
            inflight[fd] = (due, sent)
            late[bucket((sent - due) * 1e6)] += 1
            worst = max(worst, sent - due)
        nxt = t0 + n * interval
        if nxt != armed:  # wake exactly when the next request falls due
            spec.it_value.tv_sec = int(nxt)
            spec.it_value.tv_nsec = int((nxt - int(nxt)) * 1e9)
            libc.timerfd_settime(tfd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None)
            armed = nxt
        for fd, _ in ep.poll(max(0.0, end - now) + 0.01):
            if fd == tfd:
                try:
                    os.read(tfd, 8)
                except BlockingIOError:
                    pass
                continue
            try:
                data = socks[fd].recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # closed by the server: an error, and the connection leaves the pool
                errors += 1
                ep.unregister(fd)
                inflight.pop(fd, None)
                continue
            buf = bufs[fd] + data
            got = _complete(buf)
            if got is None:
                bufs[fd] = buf
                continue
            status, size = got
            bufs[fd] = buf[size:]
            done = monotonic()
            due, sent = inflight.pop(fd)
            lat[bucket((done - due) * 1e6)] += 1
            svc[bucket((done - sent) * 1e6)] += 1
            responses += 1
            errors += not 200 <= status < 400
            last = done
            idle.append(fd)
    for s in socks.values():
        s.close()
    os.close(tfd)
    return {"lat": lat, "svc": svc, "late": late, "responses": responses, "errors": errors, "first": t0,
            "last": last, "worst": worst}  # fmt: skip


def run(url: str, rate: float, seconds: float, connections: int, procs: int) -> dict[str, Any]:
    """Start `procs` worker processes on one schedule; merge their histograms."""
    t0 = time.monotonic() + 0.5  # time to connect
    per = rate / procs
    children = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                url,
                "--worker",
                "--rate",
                repr(per),
                "--seconds",
                repr(seconds),
                "--connections",
                str(max(1, connections // procs)),
                "--t0",
                repr(t0 + i / procs / per),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(procs)
    ]
    parts = [json.loads(c.communicate(timeout=seconds + 60)[0]) for c in children]
    merged: dict[str, dict[int, int]] = {"lat": {}, "svc": {}, "late": {}}
    for p in parts:
        for key, hist in merged.items():
            for i, c in p[key].items():
                hist[int(i)] = hist.get(int(i), 0) + c
    rate_got = sum((p["responses"] - 1) / (p["last"] - p["first"]) for p in parts if p["last"] > p["first"])
    return {
        "mode": "open",
        "latency_us": percentiles(merged["lat"]),  # from the intended send time: corrected
        "service_us": percentiles(merged["svc"]),  # from the actual send time: uncorrected
        "send_late_us": percentiles(merged["late"]),  # the client's own lag behind its schedule
        "worst_late_us": max(p["worst"] for p in parts) * 1e6,
        "responses": sum(p["responses"] for p in parts),
        "seconds": seconds,
        "rate": rate_got,
        "errors": sum(p["errors"] for p in parts),
        "threads": procs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, required=True, help="requests per second, in total")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64, help="in total, split over the processes")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        gc.disable()  # a collection pause would show as the client's lag; the loop makes no cycles
        print(json.dumps(worker(args.url, args.rate, args.t0, args.seconds, args.connections)))
        return 0
    print("openloop " + json.dumps(run(args.url, args.rate, args.seconds, args.connections, args.procs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
