"""The pieces of the primary's /metrics (metrics.py): a worker's answer digested into rendered keys,
and the 0.0.4 text format written by hand (the primary never imports prometheus_client).

`digest` and `render_app` are generators: they yield every STEP samples, so that metrics.py runs
them a slice at a time on the loop thread. A digested answer keeps one string (a sample's name and
its sorted labels, as rendered) and one number per sample, not the decoded lists and dicts: the
primary's memory stays small with 20,000 series.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from . import protocol
from .worker_metrics import BOUNDS

STEP = 250  # samples between two yields
STATES = ("starting", "ready", "draining", "hung")
_SUMMED = {"counter": ("",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}

Family = tuple[str, dict[str, float], dict[str, float]]  # kind, summed samples, the worker's own


class Digested:
    """A worker's checked answer: families by name, each (kind, {key: value} summed across workers,
    {key with its worker label: value})."""

    __slots__ = ("stats", "duration", "cut", "families")

    def __init__(self, stats: dict[str, int], duration: Any, cut: str) -> None:
        self.stats = stats
        self.duration = duration
        self.cut = cut
        self.families: dict[str, Family] = {}


def digest(wid: int, figures: dict[str, Any], max_samples: int, max_chars: int,
           kinds: dict[str, tuple[str, str]], max_kinds: int) -> Iterator[None]:
    """Check (protocol.check_family) and digest an answer whose envelope protocol.check passed;
    past max_samples or max_chars the rest is cut. Returns a Digested (raises protocol.Invalid)."""
    out = Digested(figures["stats"], figures.get("duration"), figures.get("cut") or "")
    count = chars = 0
    worker = str(wid)
    for family in figures.get("families", ()):
        name, kind, doc, samples = family
        count += 1 + len(samples)
        if count > max_samples:
            out.cut = out.cut or f"more than {max_samples} samples"
            break
        summed: dict[str, float] = {}
        apart: dict[str, float] = {}
        suffixes = _SUMMED.get(kind, ())
        for start in range(0, max(1, len(samples)), STEP):
            chars += protocol.check_family(family, start, start + STEP)
            if chars > max_chars:
                break
            for sample, labels, value in samples[start:start + STEP]:
                if sample[len(name):] in suffixes:
                    summed[_key(sample, labels)] = value  # a repeated label set: the last one counts
                else:
                    label = "worker" if "worker" not in labels else "prefork_worker"
                    apart[_key(sample, labels, f'{label}="{worker}"')] = value
            yield
        if chars > max_chars:
            out.cut = out.cut or f"more than {max_chars} characters"
            break
        if name in out.families or name.startswith("prefork_"):  # prefork's own names are not the app's
            continue
        if name not in kinds and len(kinds) < max_kinds:
            kinds[name] = (kind, doc)
        out.families[name] = (kind, summed, apart)
    return out


def _key(sample: str, labels: dict[str, str], extra: str = "") -> str:
    text = ",".join(f'{k}="{escape_label(v)}"' for k, v in sorted(labels.items()))
    if extra:
        text = f"{text},{extra}" if text else extra
    return f"{sample}{{{text}}}" if text else sample


def render_app(out: list[str], kinds: dict[str, tuple[str, str]], carried: dict[str, dict[str, float]],
               lasts: list[Digested]) -> Iterator[None]:
    """The apps' families, merged (metrics.py's docstring); a sample whose name is another family's
    is left out, so no series is written twice."""
    names = set(carried)
    for figures in lasts:
        names.update(figures.families)
    rows = 0
    for name in sorted(names):
        if name not in kinds:
            continue
        kind, doc = kinds[name]
        others = {name + s for s in protocol.SUFFIXES if s and name + s in kinds}
        sums = dict(carried.get(name, ()))
        apart: list[tuple[str, float]] = []
        for figures in lasts:
            mine = figures.families.get(name)
            if mine is None or mine[0] != kind:
                continue
            for key, value in mine[1].items():
                sums[key] = sums.get(key, 0.0) + value
            apart.extend(mine[2].items())
        out.append(_head(name, "histogram" if kind == "gaugehistogram" else kind, doc))
        for key, value in (*sums.items(), *apart):
            if others and key.partition("{")[0] in others:
                continue
            out.append(f"{key} {number(value)}\n")
            rows += 1
            if rows % STEP == 0:
                yield


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


def escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
