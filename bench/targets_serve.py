"""The load shapes of bench/serve.py and issue #13's targets for them, which bench/all.py checks.

For every shape: prefork's ASGI at least 1.1x the best of Node's cluster, uvicorn, gunicorn with
uvicorn's worker and granian (keep-alive and `Connection: close`; for `many`, keep-alive only, also a
p99 at most 1.5x the lowest peer's); prefork's WSGI at least granian's WSGI and twice gunicorn gthread;
`--policy rr` with `Connection: close` at least uvicorn's. A MISS carries prefork's CPU per request
(primary and workers, user and kernel) and the peer's total, from the same measurement.
"""

from __future__ import annotations

from collections.abc import Callable

# shape -> (wrk threads, wrk connections, measured with `Connection: close` too)
SHAPES: dict[str, tuple[int, int, bool]] = {
    "t1c64": (1, 64, True),
    "t2c32": (2, 32, True),
    "many": (2, 2000, False),  # thousands of keep-alive clients: what a fan-in of idle-ish clients costs
}
KEEP, CLOSE = "keep-alive", "Connection: close"
# Its cases keep the names bench/serve.py used before it had shapes (wrk -t2; close was -c32 then
# too, keep-alive -c64), so earlier results and bench/chart.py's serve panel still match them.
LEGACY_SHAPE = "t2c32"
CPU_PARTS = ("primary user", "primary kernel", "workers user", "workers kernel")
CPU_TOTAL = "cpu us/req"
SOCKETS = "sockets mid-run"  # recorded for `many`: the sockets the server's processes hold halfway

ASGI_PEERS = ("node cluster", "uvicorn", "gunicorn uvicorn", "granian asgi")

Get = Callable[[str, str, str], "float | None"]  # (case, subject, metric) -> median, None if not measured
Result = tuple[str, str, str]  # PASS/MISS/n/a, label, figure


def modes(shape: str) -> tuple[str, ...]:
    return (KEEP, CLOSE) if SHAPES[shape][2] else (KEEP,)


def case(shape: str, mode: str) -> str:
    """The records' case of a rate measurement: "hello, keep-alive, t1c64" ("hello, keep-alive" for t2c32)."""
    return f"hello, {mode}" if shape == LEGACY_SHAPE else f"hello, {mode}, {shape}"


def cpu_case(shape: str, mode: str) -> str:
    """The case of the same measurement's CPU per request."""
    return f"{case(shape, mode)}, CPU us/req"


def wrk_label(shape: str) -> str:
    threads, connections, _ = SHAPES[shape]
    return f"wrk -t{threads} -c{connections}"


def cpu_breakdown(get: Get, shape: str, mode: str, subject: str) -> str:
    """ "prefork asgi CPU 41.0 us/req: primary 1.2 (user 0.4, kernel 0.8), workers 39.8 (...)"."""
    c = cpu_case(shape, mode)
    parts = {p: get(c, subject, p) for p in CPU_PARTS}
    total = get(c, subject, CPU_TOTAL)
    if total is None or any(v is None for v in parts.values()):
        return f"{subject} CPU not measured"
    side = {}
    for who in ("primary", "workers"):
        user, kernel = parts[f"{who} user"], parts[f"{who} kernel"]
        side[who] = f"{who} {user + kernel:.1f} (user {user:.1f}, kernel {kernel:.1f})"  # type: ignore[operator]
    return f"{subject} CPU {total:.1f} us/req: {side['primary']}, {side['workers']}"


def _verdict(
    get: Get,
    shape: str,
    mode: str,
    label: str,
    ours: str,
    peers: tuple[str, ...],
    metric: str,
    bound: float,
) -> Result:
    """ours / the best of peers on metric (the highest rate, or the lowest latency) against bound."""
    c = case(shape, mode)
    higher = metric == "req/s"
    mine = get(c, ours, metric)
    theirs = {p: v for p in peers if (v := get(c, p, metric))}
    if mine is None or not theirs:
        return ("n/a", label, "not measured")
    best = (max if higher else min)(theirs, key=lambda p: theirs[p])
    value = mine / theirs[best]
    passed = value >= bound if higher else value <= bound
    figure = f"{value:.2f}x {best} (target {'>=' if higher else '<='} {bound:g})"
    if len(theirs) < len(peers):
        figure += f", {len(theirs)} of {len(peers)} peers measured"
    if not higher:  # a server that leaves clients in its listen queue keeps them out of its latency
        wanted = SHAPES[shape][1]
        for who in (ours, best):
            held = get(c, who, SOCKETS)
            if held is not None and held < 0.9 * wanted:
                figure += f"; {who} held {held:.0f} sockets for {wanted} clients mid-run (the others waited)"
    if not passed:
        peer_total = get(cpu_case(shape, mode), best, CPU_TOTAL)
        figure += f"; {cpu_breakdown(get, shape, mode, ours)}; {best} CPU "
        figure += "not measured" if peer_total is None else f"{peer_total:.1f} us/req"
    return ("PASS" if passed else "MISS", label, figure)


def check(get: Get, shapes: tuple[str, ...] = tuple(SHAPES)) -> list[Result]:
    """Every per-shape target of issue #13, in the order of the shapes."""
    out = []
    for shape in shapes:
        wrk = wrk_label(shape)
        for mode in modes(shape):
            where = f"{mode}, {wrk}"
            out.append(_verdict(get, shape, mode, f"serve ASGI at least 1.1x the best of Node, uvicorn, "
                                f"gunicorn+uvicorn, granian ({where})",
                                "prefork asgi", ASGI_PEERS, "req/s", 1.1))
            if shape == "many":
                out.append(_verdict(get, shape, mode, f"serve ASGI p99 at most 1.5x the lowest of the same "
                                    f"peers ({where})", "prefork asgi", ASGI_PEERS, "p99 ms", 1.5))
            out.append(_verdict(get, shape, mode, f"serve WSGI at least granian's WSGI ({where})",
                                "prefork wsgi", ("granian wsgi",), "req/s", 1.0))
            out.append(_verdict(get, shape, mode, f"serve WSGI at least 2x gunicorn gthread ({where})",
                                "prefork wsgi", ("gunicorn gthread",), "req/s", 2.0))
        if CLOSE in modes(shape):
            out.append(_verdict(get, shape, CLOSE, f"serve --policy rr: Connection: close at least "
                                f"uvicorn's ({wrk})", "prefork asgi rr", ("uvicorn",), "req/s", 1.0))
    return out
