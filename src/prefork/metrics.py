"""The primary's /metrics (admin.py): prefork's own figures and the workers' merged, rendered by hand.

The primary never imports prometheus_client (an optional extra, and the primary stays small): the
0.0.4 text format is written here. At each scrape the primary asks every connected worker for its
figures (["m", seq], worker_metrics.py builds the answer) and renders once all have answered or
after ANSWER_WITHIN, without blocking its loop; a worker that did not answer in time contributes
the figures it sent last. Scrapes that come while one is gathering share its answers.

An app's prometheus_client samples are merged into one exposition for the whole cluster:
counters, histograms' _bucket/_count/_sum and summaries' _count/_sum are summed across workers per
label set; gauges (and every other sample) get a `worker` label. So that a sum never goes down when
a worker exits, the last figures seen from each exited worker are carried into the sums; what it
counted after its last scrape is lost (prometheus_client's multiprocess mode keeps it in files, at
the price of PROMETHEUS_MULTIPROC_DIR, files to clean, and gauges that need a mode to be merged).
Everything here runs on the primary's loop thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .worker_metrics import BOUNDS

ANSWER_WITHIN = 0.5
MAX_KEPT = 50_000  # families and carried series the primary keeps at most (workers come and go)
STATES = ("starting", "ready", "draining", "hung")
_SUMMED = {"counter": ("",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}

Key = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels


class Metrics:
    """Gathers and renders /metrics for a Supervisor (see the module docstring)."""

    def __init__(self, supervisor: Any) -> None:
        self.sup = supervisor
        self.last: dict[int, dict[str, Any]] = {}  # worker id -> the figures it sent last
        self.carried: dict[str, dict[Key, float]] = {}  # exited workers' summed samples, per family
        self.carried_duration = [[0] * (len(BOUNDS) + 1), 0.0]
        self.kinds: dict[str, tuple[str, str]] = {}  # family -> (type, help), as first seen
        self.seq = 0
        self.waiting: set[int] = set()
        self.callers: list[Callable[[bytes, bool], None]] = []
        self.timer: Any = None

    def attach(self) -> None:
        """On the loop: hear the workers' answers and exits."""
        primary = self.sup.primary
        primary.internal["M"] = self._on_answer
        primary.cluster.on("exit", self._on_exit)

    # -- gathering -------------------------------------------------------------------------------

    def scrape(self, done: Callable[[bytes, bool], None]) -> None:
        """Ask every worker, then call done(text, ok) once they answered or the time is up."""
        self.callers.append(done)
        if self.timer is not None:
            return  # a gathering is under way: this scrape gets its answers too
        self.seq += 1
        self.waiting = set()
        for member in self.sup.members.values():
            worker = member.worker
            channel = worker._channel
            if worker.is_connected() and channel is not None:
                try:
                    channel.send_internal(["m", self.seq])
                except Exception:  # a channel that just closed: its last figures stand
                    continue
                self.waiting.add(worker.id)
        self.timer = self.sup.primary.loop.call_later(ANSWER_WITHIN, self._finish)
        if not self.waiting:
            self._finish()

    def _on_answer(self, worker: Any, message: Any, fds: list[int]) -> None:
        if worker.id not in self.sup.members:  # read after its exit: kept, it would never be carried
            return
        figures = message[2]
        self.last[worker.id] = figures
        worker.stats = figures["stats"]  # fresher than the last heartbeat's: `ctl status` shows it too
        kinds = self.kinds
        for family in figures.get("families", ()):
            if family[0] not in kinds and len(kinds) < MAX_KEPT:
                kinds[family[0]] = (family[1], family[2])
        if message[1] == self.seq and worker.id in self.waiting:
            self.waiting.discard(worker.id)
            if not self.waiting:
                self._finish()

    def _finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        callers, self.callers = self.callers, []
        try:
            text = self.render().encode()
        except Exception as exc:  # a bug here costs the scrape (a 500), never the loop
            text = f"# cannot render the metrics: {type(exc).__name__}: {exc}\n".encode()
            for done in callers:
                done(text, False)
            return
        for done in callers:
            done(text, True)

    def _on_exit(self, worker: Any, code: Any, signame: Any) -> None:
        """Carry an exited worker's last counts into the sums (counters never go down); a scrape
        that waited only for it is answered now."""
        figures = self.last.pop(worker.id, None)
        if figures is not None:
            self._carry(figures)
        if worker.id in self.waiting:
            self.waiting.discard(worker.id)
            if not self.waiting and self.timer is not None:
                self._finish()

    def _carry(self, figures: dict[str, Any]) -> None:
        duration = figures.get("duration")
        if duration is not None:
            counts = self.carried_duration[0]
            for i, n in enumerate(duration[0]):
                counts[i] += n
            self.carried_duration[1] += duration[1]
        kept = sum(len(series) for series in self.carried.values())
        for name, _kind, _help, samples in self._families(figures):
            carried = self.carried.setdefault(name, {})
            for key, value in samples:
                if key in carried or kept < MAX_KEPT:  # bounded: a worker may invent label sets
                    kept += key not in carried
                    carried[key] = carried.get(key, 0.0) + value

    def _families(self, figures: dict[str, Any]) -> list[tuple[str, str, str, list[tuple[Key, float]]]]:
        """A worker's families whose samples are summed, each with only those samples."""
        out = []
        for name, kind, doc, samples in figures.get("families", ()):
            if self.kinds.get(name, ("",))[0] != kind or kind not in _SUMMED:
                continue
            summed = [(_key(s, labels), value) for s, labels, value in samples if _summed(name, kind, s)]
            out.append((name, kind, doc, summed))
        return out

    # -- rendering -------------------------------------------------------------------------------

    def render(self) -> str:
        sup, out = self.sup, []
        members = sorted(sup.members.values(), key=lambda m: m.worker.id)
        states = {state: 0 for state in STATES}
        for member in members:
            states[member.state] = states.get(member.state, 0) + 1
        _family(out, "prefork_workers", "gauge", "Workers by state.",
                [("", {"state": state}, n) for state, n in states.items()])
        _family(out, "prefork_ready", "gauge", "1 when the primary takes traffic (/readyz is 200).",
                [("", {}, int(sup.readiness()[0]))])
        _family(out, "prefork_worker_restarts_total", "counter", "Workers started again after they died.",
                [("", {}, sup.restarts_total)])
        _family(out, "prefork_reloads_total", "counter", "Rolling reloads, by result.",
                [("", {"result": r}, sup.reloads.get(r, 0)) for r in ("ok", "failed")])
        _family(out, "prefork_handoffs_total", "counter",
                "Connections the primary handed to workers (policies rr and least_conn).",
                [("", {}, _handoffs())])
        stats = [(str(m.worker.id), m.worker.stats) for m in members]
        _family(out, "prefork_requests_total", "counter", "Requests served, per worker.",
                [("", {"worker": w}, s.get("requests", 0)) for w, s in stats])
        _family(out, "prefork_connections", "gauge", "Connections open now, per worker.",
                [("", {"worker": w}, s.get("open", 0)) for w, s in stats])
        _family(out, "prefork_worker_rss_bytes", "gauge", "Resident memory of each worker.",
                [("", {"worker": str(m.worker.id)}, m.rss) for m in members])
        self._render_durations(out, members)
        self._render_app(out, members)
        return "".join(out)

    def _render_durations(self, out: list[str], members: list[Any]) -> None:
        counts, total = list(self.carried_duration[0]), self.carried_duration[1]
        seen = any(counts)
        for member in members:
            duration = self.last.get(member.worker.id, {}).get("duration")
            if duration is not None:
                seen = True
                counts = [a + b for a, b in zip(counts, duration[0], strict=True)]
                total += duration[1]
        if not seen:
            return
        samples: list[tuple[str, dict[str, str], float]] = []
        running = 0
        for bound, n in zip((*BOUNDS, math.inf), counts, strict=True):
            running += n
            samples.append(("_bucket", {"le": _number(bound)}, running))
        samples += [("_count", {}, running), ("_sum", {}, total)]
        _family(out, "prefork_request_duration_seconds", "histogram",
                "Time from a request's first byte to the end of its response (prefork serve).", samples)

    def _render_app(self, out: list[str], members: list[Any]) -> None:
        """The apps' prometheus_client families, merged (module docstring)."""
        sums: dict[str, dict[Key, float]] = {n: dict(c) for n, c in self.carried.items()}
        apart: dict[str, list[tuple[str, dict[str, str], float]]] = {}
        for member in members:
            wid = str(member.worker.id)
            for name, kind, _doc, samples in self.last.get(member.worker.id, {}).get("families", ()):
                if self.kinds.get(name, ("",))[0] != kind or name.startswith("prefork_"):
                    continue
                total = sums.setdefault(name, {})
                for sample, labels, value in samples:
                    if _summed(name, kind, sample):
                        key = _key(sample, labels)
                        total[key] = total.get(key, 0.0) + value
                    else:
                        label = "worker" if "worker" not in labels else "prefork_worker"
                        apart.setdefault(name, []).append((sample, {**labels, label: wid}, value))
        for name in sorted(set(sums) | set(apart)):
            kind, doc = self.kinds.get(name, ("untyped", ""))
            rows = [(s, dict(labels), v) for (s, labels), v in sums.get(name, {}).items()]  # as first seen
            rows += apart.get(name, [])
            _family(out, name, "histogram" if kind == "gaugehistogram" else kind, doc, rows, absolute=True)


def _summed(family: str, kind: str, sample: str) -> bool:
    suffixes = _SUMMED.get(kind)
    return suffixes is not None and any(sample == family + s for s in suffixes)


def _key(sample: str, labels: dict[str, str]) -> Key:
    return sample, tuple(sorted(labels.items()))


def _handoffs() -> int:
    from .policies.round_robin import handed_out

    return handed_out[0]


def _family(out: list[str], name: str, kind: str, doc: str,
            samples: list[tuple[str, dict[str, str], float]], absolute: bool = False) -> None:
    """HELP, TYPE and the samples; a sample's name is the family's plus its suffix, or (absolute)
    the sample's own."""
    out.append(f"# HELP {name} {_escape_help(doc)}\n# TYPE {name} {kind}\n")
    for sample, labels, value in samples:
        full = sample if absolute else name + sample
        if labels:
            text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            out.append(f"{full}{{{text}}} {_number(value)}\n")
        else:
            out.append(f"{full} {_number(value)}\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
