"""The primary's /metrics (admin.py): prefork's own figures and the workers' merged, rendered by hand.

The primary never imports prometheus_client (an optional extra, and the primary stays small): the
0.0.4 text format is written here (metrics_text.py). At each scrape the primary asks every
connected worker for its figures (["m", seq, samples, chars], worker_metrics.py builds the answer)
and renders once all have answered or after ANSWER_WITHIN; a worker that did not answer in time
contributes the figures it sent last. A scrape that comes while one is gathering waits for the
next gathering, which starts when that one ends: what it shows was asked for after it came, so a
count is exact for a client that scrapes right after its requests.

The work is bounded for the whole cluster, not per worker: a scrape's budget (BUDGET_SAMPLES,
BUDGET_CHARS) is shared by the workers, each told its share, and a worker past it cuts its families
(`prefork_metrics_truncated` says which, and the log says so once). Checking and digesting an
answer, and rendering, run on the loop thread in slices of about SLICE seconds (`_run`), so a
probe of /readyz is answered between two slices while a scrape of 20,000 samples goes on.

An app's prometheus_client samples are merged into one exposition for the whole cluster:
counters, histograms' _bucket/_count/_sum and summaries' _count/_sum are summed across workers per
label set; gauges (and every other sample) get a `worker` label. So that a sum never goes down when
a worker exits, the last figures seen from each exited worker are carried into the sums; what it
counted after its last scrape is lost (prometheus_client's multiprocess mode keeps it in files, at
the price of PROMETHEUS_MULTIPROC_DIR, files to clean, and gauges that need a mode to be merged).
A family named prefork_* is prefork's own: a worker's is dropped when digested (never carried, never
rendered). Everything here runs on the primary's loop thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from . import protocol
from .metrics_text import (
    Digested,
    digest,
    escape_help,
    escape_label,
    family,
    number,
    render_app,
    summed_values,
)
from .metrics_text import render_own as _render_own
from .worker_metrics import BOUNDS, MAX_CHARS, MAX_SAMPLES

ANSWER_WITHIN = 0.5
MAX_KEPT = 50_000  # families and carried series the primary keeps at most (workers come and go)
BUDGET_SAMPLES = 20_000  # of the apps' registries, per scrape, for all workers together
BUDGET_CHARS = 2 << 20  # their names, help texts and label text, likewise
MAX_QUEUED = 4  # a worker's answers waiting to be digested: one that sends unasked costs no memory
SLICE = 0.001  # seconds of work on the loop before it polls again

# the names the tests and other modules use
_escape_help, _escape_label, _number, _family = escape_help, escape_label, number, family

Key = str  # a sample's name and sorted labels, as rendered: 'x_total{path="/"}'


class Metrics:
    """Gathers and renders /metrics for a Supervisor (see the module docstring)."""

    def __init__(self, supervisor: Any) -> None:
        self.sup = supervisor
        self.loop: Any = None
        self.last: dict[int, Digested] = {}  # worker id -> the figures it sent last
        self.carried: dict[str, dict[Key, float]] = {}  # exited workers' summed samples, per family
        self.carried_duration = [[0] * (len(BOUNDS) + 1), 0.0]
        self.kinds: dict[str, tuple[str, str]] = {}  # family -> (type, help), as first seen
        self.seq = 0
        self.budget = (BUDGET_SAMPLES, BUDGET_CHARS)  # each worker's share in the current gathering
        self.waiting: set[int] = set()
        self.callers: list[Callable[[list[bytes], bool], None]] = []  # of the gathering under way
        self.next_callers: list[Callable[[list[bytes], bool], None]] = []  # came during it: the next one
        self.timer: Any = None
        self.rendering = False
        self.jobs: list[Iterator[None]] = []  # digests waiting for the loop, in order
        self.queued: dict[int, int] = {}  # worker id -> its answers in self.jobs
        self.told_cut = False

    def attach(self) -> None:
        """On the loop: hear the workers' answers and exits."""
        _big_blocks_mapped()
        primary = self.sup.primary
        self.loop = primary.loop
        primary.internal["M"] = self._on_answer
        primary.cluster.on("exit", self._on_exit)

    # -- gathering -------------------------------------------------------------------------------

    def scrape(self, done: Callable[[list[bytes], bool], None]) -> None:
        """Ask every worker, then call done(text, ok) once they answered or the time is up."""
        if self.timer is not None or self.rendering:
            self.next_callers.append(done)  # its answers were asked for before this scrape came
            return
        self.callers.append(done)
        self._gather()

    def _gather(self) -> None:
        """Ask every connected worker for its figures, for self.callers."""
        self.seq += 1
        self.waiting = set()
        members = list(self.sup.members.values())
        share = max(1, len(members))
        self.budget = (max(200, BUDGET_SAMPLES // share), max(64 << 10, BUDGET_CHARS // share))
        for member in members:
            worker = member.worker
            channel = worker._channel
            if worker.is_connected() and channel is not None:
                try:
                    channel.send_internal(["m", self.seq, *self.budget])
                except Exception:  # a channel that just closed: its last figures stand
                    continue
                self.waiting.add(worker.id)
        self.timer = self.loop.call_later(ANSWER_WITHIN, self._finish)
        if not self.waiting:
            self._finish()

    def _on_answer(self, worker: Any, message: Any, fds: list[int]) -> None:
        """An "M" whose envelope protocol.py checked: its families are checked and digested in
        slices, in order of arrival; past MAX_QUEUED of a worker's, one it did not ask for."""
        queued = self.queued.get(worker.id, 0)
        if queued >= MAX_QUEUED:
            return
        self.queued[worker.id] = queued + 1
        self.jobs.append(self._digest(worker, message[1], message[2]))
        if len(self.jobs) == 1:
            self._run()

    def _digest(self, worker: Any, seq: int, figures: dict[str, Any]) -> Iterator[None]:
        samples, chars = self.budget if seq == self.seq else (MAX_SAMPLES, MAX_CHARS)
        try:
            digested = yield from digest(worker.id, figures, samples, chars, self.kinds, MAX_KEPT)
        except protocol.Invalid as exc:
            self.sup.primary._bad_message(worker, "M", str(exc))
            digested = None
        finally:
            left = self.queued.pop(worker.id, 1) - 1
            if left:
                self.queued[worker.id] = left
        if worker.id not in self.sup.members:  # read after its exit: kept, it would never be carried
            return
        if digested is not None:
            self.last[worker.id] = digested
            worker.stats = digested.stats  # fresher than the last heartbeat's: `ctl status` shows it too
            if digested.cut and not self.told_cut:
                self.told_cut = True
                self.sup.log(f"/metrics: worker {worker.id}'s figures were cut ({digested.cut}); "
                             "prefork_metrics_truncated says when it happens again")
        if seq == self.seq and worker.id in self.waiting:
            self.waiting.discard(worker.id)
            if not self.waiting and self.timer is not None:
                self._finish()

    def _run(self) -> None:
        """Run the queued jobs for SLICE seconds, then let the loop poll and come back."""
        end = time.monotonic() + SLICE
        jobs = self.jobs
        while jobs:
            try:
                next(jobs[0])
            except StopIteration:
                jobs.pop(0)
            except Exception as exc:  # a bug here costs that job, never the loop
                jobs.pop(0)
                self.sup.log(f"/metrics: {type(exc).__name__}: {exc}")
            if jobs and time.monotonic() >= end:
                self.loop.call_soon(self._run)
                return

    def _finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.rendering = True
        self.jobs.append(self._render_job())
        if len(self.jobs) == 1:
            self._run()

    def _render_job(self) -> Iterator[None]:
        callers, self.callers = self.callers, []
        out: list[bytes] = []
        try:
            yield from self.render(out)
            ok = True
        except Exception as exc:  # a bug here costs the scrape (a 500), never the loop
            out, ok = [f"# cannot render the metrics: {type(exc).__name__}: {exc}\n".encode()], False
        self.rendering = False
        for done in callers:
            done(out, ok)
        if self.next_callers:  # one gathering for all the scrapes that came during this one
            self.callers, self.next_callers = self.next_callers, []
            self._gather()

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

    def _carry(self, figures: Digested) -> None:
        if figures.duration is not None:
            counts = self.carried_duration[0]
            for i, n in enumerate(figures.duration[0]):
                counts[i] += n
            self.carried_duration[1] += figures.duration[1]
        kept = sum(len(series) for series in self.carried.values())
        for name, (kind, summed, _own) in figures.families.items():
            if self.kinds.get(name, ("",))[0] != kind or not summed:
                continue
            carried = self.carried.setdefault(name, {})
            for key, value in summed_values(summed):
                if key in carried or kept < MAX_KEPT:  # bounded: a worker may invent label sets
                    kept += key not in carried
                    carried[key] = carried.get(key, 0.0) + value

    # -- rendering -------------------------------------------------------------------------------

    def render(self, out: list[bytes]) -> Iterator[None]:
        """Append the exposition to `out` in parts, a slice at a time (a generator: see _run)."""
        members = sorted(self.sup.members.values(), key=lambda m: m.worker.id)
        last = {m.worker.id: self.last[m.worker.id] for m in members if m.worker.id in self.last}
        own: list[str] = []
        _render_own(own, self.sup, members, last, self.carried_duration)
        out.append("".join(own).encode())
        yield
        yield from render_app(out, self.kinds, self.carried, [last[w] for w in sorted(last)])


def _big_blocks_mapped() -> None:
    """Have glibc map each block of 128 KB or more on its own (and unmap it when freed). A scrape
    allocates and frees blocks of a few hundred KB (a worker's answer as read and decoded, the text)
    and glibc, after freeing one, raises its threshold and serves the next ones from its heap, which
    they fragment: the primary's RSS grew by some MBs over scrapes (t_big: 28 MB against 23 MB)."""
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD, glibc's default start
    except (ImportError, OSError, AttributeError):  # not glibc: its allocator, its own ways
        pass
