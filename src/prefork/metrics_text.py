"""The pieces of the primary's /metrics (metrics.py): a worker's answer digested into rendered keys,
and the 0.0.4 text format written by hand (the primary never imports prometheus_client).

A worker sends its samples as lines of the text format (worker_metrics.py), one string per family
and kind of sample: decoding that is one string, not a list and a dict per sample, and a
digested answer keeps those strings (checked, the worker label added to the lines not summed),
so the primary's memory stays small with 20,000 series. `digest` and `render_app` are
generators: they yield every STEP samples, so that metrics.py runs them a slice at a time on the
loop thread.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import islice
from typing import Any

from . import protocol
from .worker_metrics import BOUNDS, SUMMED, escape_label, number

STEP = 250  # samples between two yields
STATES = ("starting", "ready", "draining", "hung")

Family = tuple[str, str, bytes]  # kind, summed sample lines, the worker's own (with its worker label)


class Digested:
    """A worker's checked answer: families by name, each (kind, summed lines, own lines), lines of
    the text format joined in one string each (what the primary keeps of a worker)."""

    __slots__ = ("stats", "duration", "cut", "families")

    def __init__(self, stats: dict[str, int], duration: Any, cut: str) -> None:
        self.stats = stats
        self.duration = duration
        self.cut = cut
        self.families: dict[str, Family] = {}


def digest(wid: int, figures: dict[str, Any], max_samples: int, max_chars: int,
           kinds: dict[str, tuple[str, str]], max_kinds: int) -> Iterator[None]:
    """Check (protocol.check_line) and digest an answer whose envelope protocol.check passed; past
    max_samples or max_chars the rest is cut. Returns a Digested (raises protocol.Invalid)."""
    out = Digested(figures["stats"], figures.get("duration"), figures.get("cut") or "")
    count = chars = 0
    label = f'worker="{wid}"'
    for name, kind, doc, summed, own in figures.get("families", ()):
        count += 1 + summed.count("\n") + own.count("\n")
        chars += len(name) + len(doc) + len(summed) + len(own)
        if count > max_samples or chars > max_chars:
            out.cut = out.cut or f"more than {max_samples} samples or {max_chars} characters"
            break
        if name in out.families or name.startswith("prefork_"):  # prefork's own names are not the app's
            continue
        names, sums = protocol.family_names(name), {name + s for s in SUMMED.get(kind, ())}
        seen: set[str] = set()
        kept: tuple[list[str], list[str]] = ([], [])
        for text, mine in ((summed, kept[0]), (own, kept[1])):
            lines = text.split("\n")
            if lines.pop():
                raise protocol.Invalid(f"M: {name}'s lines must each end with a newline")
            for start in range(0, len(lines), STEP):
                for line in lines[start:start + STEP]:
                    labels, keys = protocol.check_line(names, line)
                    key, _, value = line.rpartition(" ")
                    sample = key.partition("{")[0]
                    if (sample in sums) is not (mine is kept[0]):
                        raise protocol.Invalid(f"M: {sample} is in the wrong list of {name}")
                    if key in seen:  # a series twice: the first one stands
                        continue
                    seen.add(key)
                    if mine is kept[0]:
                        mine.append(line)
                    else:
                        extra = f"prefork_{label}" if "worker" in keys else label
                        mine.append(f"{sample}{{{labels},{extra}}} {value}" if labels
                                    else f"{sample}{{{extra}}} {value}")
                yield
        if name not in kinds and len(kinds) < max_kinds:
            kinds[name] = (kind, doc)
        out.families[name] = (kind, _joined(kept[0]), _joined(kept[1]).encode())  # as it is sent
    return out


def _joined(lines: list[str]) -> str:
    return "\n".join(lines) + "\n" if lines else ""


def summed_values(lines: str) -> Iterator[tuple[str, float]]:
    """(key, value) of a digested family's summed lines (checked: each is 'key value')."""
    for line in lines.split("\n")[:-1]:
        key, _, value = line.rpartition(" ")
        yield key, float(value)


def render_app(out: list[bytes], kinds: dict[str, tuple[str, str]], carried: dict[str, dict[str, float]],
               lasts: list[Digested]) -> Iterator[None]:
    """The apps' families, merged (metrics.py's docstring); a sample whose name is another family's
    is left out, so no series is written twice."""
    names = set(carried)
    for figures in lasts:
        names.update(figures.families)
    for name in sorted(names):
        if name not in kinds:
            continue
        kind, doc = kinds[name]
        others = {name + s for s in protocol.SUFFIXES if s and name + s in kinds}
        sums = dict(carried.get(name, ()))
        own: list[bytes] = []
        for figures in lasts:
            mine = figures.families.get(name)
            if mine is None or mine[0] != kind:
                continue
            for i, (key, value) in enumerate(summed_values(mine[1]), 1):
                sums[key] = sums.get(key, 0.0) + value
                if i % STEP == 0:
                    yield
            own.append(mine[2])
        out.append(_head(name, "histogram" if kind == "gaugehistogram" else kind, doc).encode())
        rows = iter(sums.items())
        while some := list(islice(rows, STEP)):
            out.append("".join(f"{key} {number(value)}\n" for key, value in some
                               if not others or key.partition("{")[0] not in others).encode())
            yield
        del rows, sums
        for block in own:
            if others:
                block = b"".join(line + b"\n" for line in block.split(b"\n")[:-1]
                                 if line.partition(b"{")[0].partition(b" ")[0].decode() not in others)
            out.append(block)


def render_own(out: list[str], sup: Any, members: list[Any], last: dict[int, Digested],
               carried_duration: list[Any]) -> None:
    """prefork's own families."""
    states = {state: 0 for state in STATES}
    for member in members:
        states[member.state] = states.get(member.state, 0) + 1
    family(out, "prefork_workers", "gauge", "Workers by state.",
           [("", {"state": state}, n) for state, n in states.items()])
    family(out, "prefork_ready", "gauge", "1 when the primary takes traffic (/readyz is 200).",
           [("", {}, int(sup.readiness()[0]))])
    family(out, "prefork_worker_restarts_total", "counter", "Workers started again after they died.",
           [("", {}, sup.restarts_total)])
    family(out, "prefork_reloads_total", "counter", "Rolling reloads, by result.",
           [("", {"result": r}, sup.reloads.get(r, 0)) for r in ("ok", "failed")])
    family(out, "prefork_handoffs_total", "counter",
           "Connections the primary handed to workers (policies rr and least_conn).",
           [("", {}, _handoffs())])
    stats = [(str(m.worker.id), m.worker.stats) for m in members]
    family(out, "prefork_requests_total", "counter", "Requests served, per worker.",
           [("", {"worker": w}, s.get("requests", 0)) for w, s in stats])
    family(out, "prefork_connections", "gauge", "Connections open now, per worker.",
           [("", {"worker": w}, s.get("open", 0)) for w, s in stats])
    family(out, "prefork_worker_rss_bytes", "gauge", "Resident memory of each worker.",
           [("", {"worker": str(m.worker.id)}, m.rss) for m in members])
    family(out, "prefork_worker_uss_bytes", "gauge",
           "Private memory of each worker (what its exit frees; what --max-memory compares).",
           [("", {"worker": str(m.worker.id)}, m.uss) for m in members if m.uss is not None])
    family(out, "prefork_worker_pss_bytes", "gauge", "Proportional share of memory of each worker.",
           [("", {"worker": str(m.worker.id)}, m.pss) for m in members if m.pss is not None])
    family(out, "prefork_metrics_truncated", "gauge",
           "1 when a worker's app metrics were cut to its share of a scrape's budget.",
           [("", {"worker": str(m.worker.id)}, int(bool(last.get(m.worker.id) and last[m.worker.id].cut)))
            for m in members])
    _durations(out, members, last, carried_duration)


def _durations(out: list[str], members: list[Any], last: dict[int, Digested],
               carried_duration: list[Any]) -> None:
    counts, total = list(carried_duration[0]), carried_duration[1]
    seen = any(counts)
    for member in members:
        figures = last.get(member.worker.id)
        if figures is not None and figures.duration is not None:
            seen = True
            counts = [a + b for a, b in zip(counts, figures.duration[0], strict=True)]
            total += figures.duration[1]
    if not seen:
        return
    samples: list[tuple[str, dict[str, str], float]] = []
    running = 0
    for bound, n in zip((*BOUNDS, math.inf), counts, strict=True):
        running += n
        samples.append(("_bucket", {"le": number(bound)}, running))
    samples += [("_count", {}, running), ("_sum", {}, total)]
    family(out, "prefork_request_duration_seconds", "histogram",
           "Time from a request's first byte to the end of its response (prefork serve).", samples)


def _handoffs() -> int:
    from .policies.round_robin import handed_out

    return handed_out[0]


def _head(name: str, kind: str, doc: str) -> str:
    return f"# HELP {name} {escape_help(doc)}\n# TYPE {name} {kind}\n"


def family(out: list[str], name: str, kind: str, doc: str,
           samples: list[tuple[str, dict[str, str], float]]) -> None:
    """HELP, TYPE and the samples; a sample's name is the family's plus its suffix."""
    out.append(_head(name, kind, doc))
    for sample, labels, value in samples:
        if labels:
            text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            out.append(f"{name}{sample}{{{text}}} {number(value)}\n")
        else:
            out.append(f"{name}{sample} {number(value)}\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
