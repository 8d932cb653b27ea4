"""Figures as PNG files (matplotlib, Agg backend: no screen needed): the Recall@k curves of
`umr eval --plot`, the comparison bars of `umr update --eval --plot`, and the benches' charts.

Plain data in, a file out; nothing here computes a metric.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from umr.index.errors import InvalidArgument

COLOURS = ("#2f5bd3", "#e0762b", "#2a9d5c", "#c0392b", "#7b52ab", "#8c6d31", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#1b1b1b", "#ff9896")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InvalidArgument(f"plots are written as PNG: give a file name ending in .png, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return out


def recall_curves(curves: Mapping[str, Mapping[str, tuple[Sequence[int], Sequence[float]]]], out: str | Path,
                  ylabel: str = "hit rate@k (M-BEIR's Recall@k)", title: str | None = None) -> Path:
    """One panel per task, one line per encoder: curves[encoder][task] = (ks, values)."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(t for by_task in curves.values() for t in by_task))
    if not tasks:
        raise InvalidArgument("nothing to plot: no task has a curve")
    cols = min(3, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for colour, (encoder, by_task) in zip(COLOURS * 4, curves.items()):
            if task in by_task:
                ks, values = by_task[task]
                ax.plot(ks, values, color=colour, label=encoder, linewidth=1.8)
        ax.set_xscale("log")
        ax.set_xlim(1, max(max(by[task][0]) for by in curves.values() if task in by))
        ax.set_ylim(0, 1.02)
        ax.set_title(task)
        ax.set_xlabel("k")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


def lines(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], out: str | Path, xlabel: str, ylabel: str,
          title: str | None = None, logy: bool = False, markers: bool = False, overlaid: bool = False) -> Path:
    """One line per series on shared axes, series[label] = (xs, ys): a quantity over time, or a
    trade-off curve (`markers` shows each measured point; a one-point series is a point).
    `overlaid`: series expected to coincide are drawn widest first, then narrower and dashed, so
    that each stays visible where they agree."""
    plt = _pyplot()
    if not series:
        raise InvalidArgument("nothing to plot: no series")
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for i, (colour, (label, (xs, ys))) in enumerate(zip(COLOURS * 4, series.items())):
        width, style = (max(1.0, 4.5 - 1.5 * i), ("-", "--", ":", "-.")[i % 4]) if overlaid else (1.6, "-")
        ax.plot(xs, ys, color=colour, label=label, linewidth=width, linestyle=style,
                marker="o" if markers or len(xs) == 1 else None, markersize=4)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def bars(groups: Mapping[str, Mapping[str, float]], out: str | Path, ylabel: str, title: str | None = None,
         highlight: str | None = None, ylim: tuple[float, float] | None = None,
         errors: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """One panel per group, one bar per label: groups[group][label] = value, the value on each
    bar; a label keeps its colour across panels; `highlight` outlines that label's bars;
    errors[group][label] (a std over seeds, say) draws a whisker of that half-length."""
    plt = _pyplot()
    labels = list(dict.fromkeys(label for by_label in groups.values() for label in by_label))
    if not labels:
        raise InvalidArgument("nothing to plot: no values")
    colour = {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(labels)}
    widths = [max(2, len(by_label)) for by_label in groups.values()]
    fig, axes = plt.subplots(1, len(groups), figsize=(max(6.0, 0.75 * sum(widths) + 1.5), 4.4), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (group, by_label) in zip(axes[0], groups.items()):
        names = list(by_label)
        drawn = ax.bar(range(len(names)), [by_label[n] for n in names], 0.8, color=[colour[n] for n in names],
                       edgecolor=["black" if n == highlight else "none" for n in names],
                       linewidth=[2.5 if n == highlight else 0 for n in names],
                       yerr=[errors[group][n] for n in names] if errors else None, capsize=3 if errors else 0)
        ax.bar_label(drawn, fmt="%.3f" if max(abs(by_label[n]) for n in names) < 10 else "%.1f", fontsize=7, padding=2)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(group, fontsize=9)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)
