"""Plot helpers shared by the evaluations (matplotlib's object API, no pyplot and no global backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["label_bars", "bar_chart", "index_lines"]


def label_bars(ax, bars, values: Sequence[float], fmt: str = "{:.3g}") -> None:
    """Write each bar's value on it and draw the zero line, so a panel whose values are all zero (a
    pass@k of 0 everywhere) still shows its bars, named on the x axis, with their values."""
    ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=2, fontsize="small")
    ax.axhline(0.0, color="black", linewidth=0.8)
    if not any(values):
        ax.set_ylim(0.0, 1.0)  # autoscaling would centre the zero line in an empty, tiny range
    else:
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top * 1.08)  # room for the labels above the tallest bar


def bar_chart(path: Path, panels: Mapping[str, Mapping[str, Mapping[str, float]]], ylabel: str) -> Path:
    """Grouped bars, one panel per ``panels`` key: panel -> group (x axis) -> series (bar) -> value."""
    from matplotlib.figure import Figure  # lazy: matplotlib is slow to import; no pyplot, no global backend

    fig = Figure(figsize=(4.5 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, groups) in zip(axes, panels.items()):
        series = list(dict.fromkeys(s for values in groups.values() for s in values))
        width = 0.8 / max(1, len(series))
        for j, name in enumerate(series):
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
            heights = [values.get(name, 0.0) for values in groups.values()]
            label_bars(ax, ax.bar(xs, heights, width, label=name), heights)
        ax.set_xticks(range(len(groups)), list(groups))
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path


def index_lines(series: Mapping[str, Sequence[float | None]], xlabel: str, ylabel: str, title: str,
                ylim: tuple[float, float] = (-0.03, 1.05)):
    """One line per series over the indices 1, 2, ... (a Figure; the caller saves it). ``None`` means nothing
    was measured there (a draft slot no draft reached, "not measured" on the model card): it is left out of
    its line as a gap, never drawn as 0. The legend sits outside the axes, so it cannot hide a point; the
    default ``ylim`` starts a little below 0 so that a point at 0 shows its whole marker."""
    from matplotlib.figure import Figure  # lazy, as in bar_chart

    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    longest = max((len(values) for values in series.values()), default=0)
    for name, values in series.items():
        ax.plot(range(1, len(values) + 1), [math.nan if v is None else v for v in values], marker="o", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=ylim, xticks=range(1, longest + 1), title=title)
    fig.legend(loc="outside right upper", fontsize="small")
    return fig
