"""A worker's figures for the primary's /metrics (admin.py, metrics.py): built when the primary asks.

The primary sends ["m", seq] at scrape time; the worker answers ["M", seq, figures] (protocol.py)
with its counters, the request durations of `prefork serve` (a histogram kept here, BOUNDS), and,
when the app imported prometheus_client, the samples of its default registry. child.py builds the
answer on the serving loop when there is one (a serve worker), else on the callback lane
(dispatch.py), never on the channel's reading thread: an app's custom collector is app code.

prometheus_client is never imported here: only looked up in sys.modules (the app imported it).
"""

from __future__ import annotations

import bisect
import math
import sys
import time
from typing import Any

# seconds; prometheus_client's default buckets, which dashboards expect
BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
MAX_SAMPLES = 10_000  # of the app's registry, per answer
MAX_CHARS = 4 << 20  # names, help texts and label text of the app's samples, per answer
_OPENMETRICS_ONLY = ("_created", "_gsum", "_gcount")  # not in the 0.0.4 text format
# the samples the primary sums across workers, by family type (the others get a worker label)
SUMMED = {"counter": ("",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


class Durations:
    """Request durations: a count per bucket (not cumulative; the last is +Inf) and their sum.
    `observe` is on every request's path: one bisect and two additions."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BOUNDS, seconds)] += 1
        self.total += seconds


def time_requests(cls: Any, base: Any, durations: Durations) -> None:
    """Make the HTTP protocol class `cls` (over uvicorn's httptools protocol `base`) time each
    request, from its first byte (httptools' on_message_begin) to the end of its response. This is
    every request's path: base methods called directly, no super(), `observe` inlined (about 0.2 us
    a request, against 0.33 us with super() and a method call, measured with timeit)."""
    begin, complete = base.on_message_begin, cls.on_response_complete  # cls's may be keepalive.py's
    counts, clock, find = durations.counts, time.perf_counter, bisect.bisect_left

    def on_message_begin(self: Any) -> None:
        self.began = clock()
        begin(self)

    def on_response_complete(self: Any) -> None:
        elapsed = clock() - self.began
        counts[find(BOUNDS, elapsed)] += 1
        durations.total += elapsed
        complete(self)

    cls.began = 0.0
    cls.on_message_begin = on_message_begin
    cls.on_response_complete = on_response_complete


def answer(child: Any, max_samples: int = MAX_SAMPLES, max_chars: int = MAX_CHARS) -> dict[str, Any]:
    """What the worker reports: {"stats": {...}, "duration": [counts, sum]?, "families": [...]?,
    "cut": why?}; the app's samples within the budget the primary asked for (its "m" message)."""
    out: dict[str, Any] = {"stats": dict(child.stats)}
    durations = getattr(child, "durations", None)
    if durations is not None:
        out["duration"] = [list(durations.counts), durations.total]
    families, cut = app_families(min(max_samples, MAX_SAMPLES), min(max_chars, MAX_CHARS))
    if families:
        out["families"] = families
    if cut:
        out["cut"] = cut
    return out


def app_families(max_samples: int = MAX_SAMPLES, max_chars: int = MAX_CHARS) -> tuple[list[list[Any]], str]:
    """The app's prometheus_client registry as [[name, type, help, summed, own]], in the 0.0.4 text
    format's names and types (as prometheus_client's generate_latest munges them). summed and own
    are sample lines of that format ('name{labels} value\n', labels sorted): summed those the
    primary sums across workers (SUMMED), own the others, to which it adds a worker label. Text,
    not lists: it decodes as one string and keeps little (metrics_text.py). Bounded by max_samples
    and max_chars (the rest is left out, and why is returned)."""
    client = sys.modules.get("prometheus_client")
    registry = getattr(client, "REGISTRY", None)
    if registry is None:
        return [], ""
    out: list[list[Any]] = []
    count = chars = 0
    for metric in registry.collect():
        name, kind = metric.name, metric.type
        if kind == "counter":
            name += "_total"
        elif kind == "info":
            name, kind = name + "_info", "gauge"
        elif kind == "stateset":
            kind = "gauge"
        elif kind == "unknown":
            kind = "untyped"
        doc = str(metric.documentation)[:4096]
        summed_names = {name + suffix for suffix in SUMMED.get(kind, ())}
        summed: list[str] = []
        own: list[str] = []
        count += 1  # a family counts as a sample: a registry of empty families is bounded too
        chars += len(name) + len(doc)
        for sample in metric.samples:
            if sample.name.endswith(_OPENMETRICS_ONLY) and sample.name.startswith(metric.name):
                continue
            line = f"{sample_key(sample.name, sample.labels)} {number(float(sample.value))}\n"
            count += 1
            chars += len(line)
            if count > max_samples or chars > max_chars:
                break
            (summed if sample.name in summed_names else own).append(line)
        if count > max_samples or chars > max_chars:
            return out, _cut(max_samples, max_chars)
        out.append([name, kind, doc, "".join(summed), "".join(own)])
    return out, ""


def sample_key(name: str, labels: dict[str, str]) -> str:
    """A sample's name and labels as the text format writes them, labels sorted (a key to sum by)."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{escape_label(str(v))}"' for k, v in sorted(labels.items())) + "}"


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


def _cut(max_samples: int, max_chars: int) -> str:
    return (f"more than this worker's share of a scrape ({max_samples} samples, {max_chars} characters):"
            " the rest left out")
