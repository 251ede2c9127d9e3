"""PNG plots next to the benchmark tables (docs/benchmarks/), so a run can be seen at a glance."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def bars(name: str, title: str, ylabel: str, groups: dict[str, dict[str, float]]) -> Path:
    """Grouped bars: one group per key of `groups`, one bar per series inside it."""
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    fig, ax = plt.subplots(figsize=(max(6, len(groups) * 1.2), 4))
    width = 0.8 / max(len(series), 1)
    for i, s in enumerate(series):
        xs = [j + i * width for j in range(len(groups))]
        ax.bar(xs, [g.get(s, 0.0) for g in groups.values()], width, label=s)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels(list(groups), rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    return _save(fig, name)


def spreads(
    name: str, title: str, ylabel: str, rows: Sequence[tuple[str, Sequence[float]]]
) -> Path:
    """One horizontal bar per row at its median, with a line from its min to its max."""
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    labels = [r[0] for r in rows]
    medians = [statistics.median(r[1]) for r in rows]
    lows = [m - min(r[1]) for m, r in zip(medians, rows, strict=True)]
    highs = [max(r[1]) - m for m, r in zip(medians, rows, strict=True)]
    ax.barh(labels, medians, xerr=[lows, highs], capsize=4, color="#4f46e5")
    ax.invert_yaxis()
    ax.set_xlabel(ylabel)
    ax.set_title(title)
    return _save(fig, name)


def _save(fig: plt.Figure, name: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path.relative_to(OUT.parent.parent)}")
    return path
