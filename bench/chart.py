"""The chart of scripts/bench: one PNG, a panel per question, from bench/all.py's summary."""

from __future__ import annotations

import re
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

Summary = dict[tuple[str, str, str, str], dict[str, Any]]
OURS, PEER = "#1f77b4", "#bbbbbb"


def _pick(summary: Summary, bench: str, metric: str, cases: list[str]) -> dict[str, dict[str, float]]:
    """case -> subject -> median, for the given cases in that order."""
    out: dict[str, dict[str, float]] = {c: {} for c in cases}
    for (b, case, subject, m), s in summary.items():
        if b == bench and m == metric and case in out:
            out[case][subject] = s["median"]
    return {c: v for c, v in out.items() if v}


def _bars(ax: Any, data: dict[str, dict[str, float]], title: str, ylabel: str) -> None:
    subjects = list(dict.fromkeys(s for by in data.values() for s in by))
    width = 0.8 / max(1, len(data))
    for i, (case, by) in enumerate(data.items()):
        xs = [j + i * width for j in range(len(subjects))]
        ys = [by.get(s, 0) for s in subjects]
        colors = [OURS if s.startswith("prefork") else PEER for s in subjects]
        ax.bar(
            xs, ys, width, label=case, color=colors, alpha=1.0 - 0.45 * i, edgecolor="black", linewidth=0.4
        )
    ax.set_xticks([j + width * (len(data) - 1) / 2 for j in range(len(subjects))])
    ax.set_xticklabels(subjects, rotation=30, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    if len(data) > 1:  # the shade tells the case (the colour tells prefork from its peers)
        handles = [Patch(facecolor=OURS, alpha=1.0 - 0.45 * i, edgecolor="black", linewidth=0.4, label=case)
                   for i, case in enumerate(data)]
        ax.legend(handles=handles, fontsize=6)


def _curves(
    ax: Any,
    summary: Summary,
    bench: str,
    prefix: str,
    metric: str,
    title: str,
    ylabel: str,
    subjects: list[str] | None = None,
) -> None:
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for (b, case, subject, m), s in summary.items():
        found = re.match(rf"{re.escape(prefix)}, (\d+) workers?", case)
        if b == bench and m == metric and found and (subjects is None or subject in subjects):
            lines[subject].append((int(found.group(1)), s["median"]))
    for subject, points in sorted(lines.items()):
        points.sort()
        style = "-o" if subject.startswith("prefork") else "--s"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=subject, markersize=3)
    ax.set_xscale("log", base=2)
    ticks = sorted({p[0] for points in lines.values() for p in points})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("workers", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    if lines:
        ax.legend(fontsize=6)


def _ipc_ratios(ax: Any, summary: Summary) -> None:
    pairs = []
    for (b, case, subject, m), s in summary.items():
        other = summary.get((b, case, "node", m))
        if b == "ipc" and subject == "prefork" and other and other["median"]:
            pairs.append((case, s["median"] / other["median"]))
    ax.bar([p[0] for p in pairs], [p[1] for p in pairs], color=OURS, edgecolor="black", linewidth=0.4)
    ax.axhline(1.0, color="red", linewidth=0.8)
    ax.set_xticks(range(len(pairs)))
    ax.set_xticklabels([p[0] for p in pairs], rotation=30, ha="right", fontsize=7)
    ax.set_title("channel: prefork / Node's cluster IPC (above 1 = faster)", fontsize=9)
    ax.set_ylabel("ratio", fontsize=8)


def draw(summary: Summary, title: str, path: Path) -> None:
    fig, axes = plt.subplots(3, 3, figsize=(16, 13))
    _bars(
        axes[0][0],
        _pick(summary, "serve", "req/s", ["hello, keep-alive", "hello, Connection: close"]),
        "prefork serve and its peers, hello world, 2 workers",
        "req/s",
    )
    _bars(
        axes[0][1],
        _pick(summary, "policies", "req/s", ["hello, close", "hello, keep-alive"]),
        "scheduling policies (library), 2 workers",
        "req/s",
    )
    _bars(
        axes[0][2],
        _pick(summary, "policies", "Jain", ["hello, close", "uneven work, close"]),
        "split of connections between workers (Jain's index)",
        "Jain",
    )
    axes[0][2].set_ylim(0.5, 1.01)
    _ipc_ratios(axes[1][0], summary)
    _curves(
        axes[1][1],
        summary,
        "scale",
        "hand-off",
        "conn/s",
        "new connections/s against workers",
        "conn/s (Connection: close)",
    )
    _curves(
        axes[1][2],
        summary,
        "scale",
        "hand-off",
        "primary CPU ms per 1k conn",
        "primary CPU per 1,000 connections",
        "ms",
    )
    _curves(axes[2][0], summary, "scale", "memory", "primary RSS MB", "primary RSS against workers", "MB")
    _curves(axes[2][1], summary, "scale", "memory", "worker USS MB", "memory each worker adds (USS)", "MB")
    _bars(
        axes[2][2],
        _pick(summary, "lifecycle", "ms", ["respawn, kill to listening"]),
        "respawn, kill to listening (lower is better)",
        "ms",
    )
    fig.suptitle("\n".join(textwrap.wrap(title, 160)), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)
