"""The comparison's figures: accuracy against sparsity and cost, the searched
hyperparameters, the learning curves.

Layout: constrained layout, legends below the axes (outside, wrapped labels naming only
what differs between groups), saved cropped to what is drawn, so no label is cut off and
matplotlib has nothing to warn about. Numbers on labels use the table's digits.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zosam.compare.export import display_columns, shown, value_formats
from zosam.compare.group import Group, sort_key
from zosam.compare.records import HEADLINE
from zosam.pareto import pareto_front
from zosam.plotting import pyplot, save
from zosam.tables import distinct_digits

LABEL_WIDTH = 46  # characters per legend line


def axis_name(column: str) -> str:
    """``sparse.update_interval`` -> ``update_interval``: plot labels have little room."""
    return column.rsplit(".", 1)[-1]


def group_labels(groups: Sequence[Group], columns: Sequence[str], width: int = LABEL_WIDTH) -> dict[int, str]:
    """``{id(group): label}``: the optimizer, then the key values that differ between groups."""
    cols = [c for c in display_columns(groups, columns)
            if c != "optimizer" and len({g.value(c) for g in groups}) > 1]
    formats = value_formats(groups, cols)
    out = {}
    for g in groups:
        parts = [f"{axis_name(c)}={shown(g, c, formats)}" for c in cols if g.value(c) is not None]
        out[id(g)] = textwrap.fill(" ".join([g.value("optimizer") or "?", *parts]), width)
    return out


def _figure(width: float, legend_lines: int) -> tuple[Any, Any]:
    """A figure with room below the axes for a legend of ``legend_lines`` lines of text."""
    plt = pyplot()
    return plt.subplots(figsize=(width, 4.0 + 0.16 * legend_lines), layout="constrained")


def _legend_below(fig: Any, handles: Sequence[Any], labels: Sequence[str], ncols: int = 2) -> None:
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(ncols, len(handles)), fontsize=7,
                   frameon=False)


def _lines(labels: Sequence[str], ncols: int) -> int:
    heights = [label.count("\n") + 1 for label in labels]
    return sum(max(heights[i:i + ncols]) for i in range(0, len(heights), ncols))


def _density(g: Group) -> float:
    try:
        return float(g.value("density") or "nan")
    except ValueError:
        return math.nan


def accuracy_vs_sparsity_figure(groups: Sequence[Group]) -> Any:
    """Final accuracy (mean ± std over seeds) against sparsity = 1 - density, one series per
    optimizer (and host where several); the line joins each series' best group per sparsity."""
    hosts = {g.value("host") for g in groups}
    series: dict[str, list[Group]] = {}
    for g in groups:
        if g.completed:
            name = g.value("optimizer") or "?"
            series.setdefault(name + (f" / {g.value('host')}" if len(hosts) > 1 else ""), []).append(g)
    fig, ax = _figure(6.4, _lines(list(series), 4))
    handles = []
    for name, gs in sorted(series.items()):
        xs = [1 - _density(g) for g in gs]
        ys = [100 * g.mean(HEADLINE) for g in gs]
        es = [0.0 if math.isnan(s) else 100 * s for s in (g.std(HEADLINE) for g in gs)]
        bar = ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, alpha=0.6)
        best: dict[float, float] = {}
        for x, y in zip(xs, ys, strict=True):
            best[x] = max(best.get(x, -math.inf), y)
        bx = sorted(best)
        handles += ax.plot(bx, [best[x] for x in bx], "-o", ms=3, color=bar[0].get_color(), label=name)
    ax.set_xlabel("sparsity (1 - density)")
    ax.set_ylabel("final test accuracy %")
    ax.set_title("accuracy vs. sparsity (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    _legend_below(fig, handles, [h.get_label() for h in handles], ncols=4)
    return fig


def accuracy_vs_cost_figure(groups: Sequence[Group], columns: Sequence[str], cost: str = "train_time_s") -> Any:
    """Final accuracy against a training cost (group means), with the Pareto front marked and
    its points numbered (the legend names them)."""
    from matplotlib.lines import Line2D

    pts = [(g.mean(cost), 100 * g.mean(HEADLINE), g) for g in groups]
    pts = [p for p in pts if not (math.isnan(p[0]) or math.isnan(p[1]))]
    front = sorted((pts[i] for i in pareto_front([(p[0], p[1]) for p in pts], ("min", "max"))),
                   key=lambda p: p[0])  # cheapest first, for the step line
    labels = group_labels(groups, columns)
    by_opt: dict[str, list] = {}
    for p in pts:
        by_opt.setdefault(p[2].value("optimizer") or "?", []).append(p)
    front_labels = [f"{i}: {labels[id(p[2])]}" for i, p in enumerate(front, 1)]
    fig, ax = _figure(6.4, _lines([*by_opt, "Pareto front"], 3) + _lines(front_labels, 2))
    handles = []
    for name, ps in sorted(by_opt.items()):
        handles += ax.plot([p[0] for p in ps], [p[1] for p in ps], "o", alpha=0.7, label=name)
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], "r--", where="post", lw=1)
        handles += ax.plot([p[0] for p in front], [p[1] for p in front], "o", mfc="none", mec="red", ms=11,
                           label="Pareto front")
        for i, p in enumerate(front, 1):
            ax.annotate(str(i), (p[0], p[1]), fontsize=8, xytext=(6, 4), textcoords="offset points", color="red")
    ax.set_xlabel(f"training cost: {cost} (mean over seeds)")
    ax.set_ylabel("final test accuracy %")
    ax.set_title("accuracy vs. training cost")
    ax.grid(alpha=0.3)
    key = [Line2D([], [], ls="", marker=f"${i}$", color="red") for i in range(1, len(front) + 1)]
    _legend_below(fig, [*handles, *key], [h.get_label() for h in handles] + front_labels)
    return fig


def axis_values(values: Sequence[str | None]) -> tuple[list[float], list[float], list[str]]:
    """Map one hyperparameter's values to [0, 1] for a parallel-coordinates axis.

    Numbers go linearly (log10 when all positive and spanning more than 10x); anything
    else becomes evenly spaced categories. Missing values (``None``: e.g. rho of SGD) sit
    at 0, labelled ``n/a``, with the numbers then in [0.15, 1]. Tick labels carry the
    table's significant digits.
    Returns (positions, tick positions, tick labels).
    """
    present = [v for v in values if v is not None]
    try:
        nums = [float(v) for v in present]
    except ValueError:
        nums = []
    if present and nums and all(math.isfinite(x) for x in nums):
        lo, hi = min(nums), max(nums)
        log = lo > 0 and hi / lo > 10
        f = (lambda x: math.log10(x)) if log else (lambda x: x)
        base = 0.15 if len(present) < len(values) else 0.0
        span = (f(hi) - f(lo)) / (1 - base) or 1.0
        place = lambda x: base + (f(x) - f(lo)) / span  # noqa: E731
        pos = [0.0 if v is None else place(float(v)) for v in values]
        ticks = sorted(set(nums))
        if len(ticks) > 5:
            ticks = [lo, hi]
        names = distinct_digits(repr(t) for t in ticks)
        tpos, tlab = [place(t) for t in ticks], [names[repr(t)] for t in ticks]
        if base:
            tpos, tlab = [0.0, *tpos], ["n/a", *tlab]
        return pos, tpos, tlab
    cats = sorted({"n/a" if v is None else str(v) for v in values}, key=sort_key)
    step = 1 / max(len(cats) - 1, 1)
    return ([cats.index("n/a" if v is None else str(v)) * step for v in values],
            [i * step for i in range(len(cats))], cats)


def parallel_coordinates_figure(groups: Sequence[Group], columns: Sequence[str]) -> Any:
    """One line per completed run through the varying hyperparameters and its final
    accuracy, coloured by accuracy."""
    plt = pyplot()
    runs = [(r, g) for g in groups for r in g.completed]
    axes = [c for c in columns if len({g.value(c) for g in groups}) > 1] or ["optimizer"]
    accs = [100 * r.metrics[HEADLINE] for r, _ in runs]
    columns_pos, ticks = [], []
    for c in axes:
        pos, tpos, tlab = axis_values([g.value(c) for _, g in runs])
        columns_pos.append(pos)
        ticks.append((tpos, tlab))
    apos, atpos, atlab = axis_values([f"{a:.6g}" for a in accs]) if accs else ([], [], [])
    columns_pos.append(apos)
    ticks.append((atpos, [f"{float(t):.1f}" for t in atlab]))
    names = [axis_name(c) for c in axes] + ["final acc %"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(names)), 4), layout="constrained")
    cmap = plt.get_cmap("viridis")
    lo, hi = (min(accs), max(accs)) if accs else (0, 1)
    for i, a in enumerate(accs):
        ax.plot(range(len(names)), [col[i] for col in columns_pos], "-o", ms=3, alpha=0.7,
                color=cmap((a - lo) / (hi - lo) if hi > lo else 0.5))
    for x, (tpos, tlab) in enumerate(ticks):
        ax.axvline(x, color="black", lw=0.8)
        for p, t in zip(tpos, tlab, strict=True):
            ax.text(x + 0.04, p, t, fontsize=7, va="center",
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.1, len(names) - 0.6)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("searched hyperparameters vs. final accuracy (one line per run)")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi))
    fig.colorbar(sm, ax=ax, label="final test accuracy %")
    return fig


def learning_curves_figure(groups: Sequence[Group], columns: Sequence[str],
                           histories: Mapping[str, Sequence[tuple[int, float]]], metric: str = "test_acc",
                           max_legend: int = 20) -> Any:
    """``metric`` per epoch for every selected run; one colour per group (seeds share it).
    Runs stopped early are dashed, with an x at their last epoch."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    labels = group_labels(groups, columns)
    legend = [g for g in groups if any(histories.get(r.run_id) for r in g.runs)][:max_legend]
    stopped = any(r.stopped_early and histories.get(r.run_id) for g in groups for r in g.runs)
    entries = [labels[id(g)] for g in legend] + (["stopped early (x: last epoch)"] if stopped else [])
    fig, ax = _figure(7.0, _lines(entries, 2))
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    handles = []
    for gi, g in enumerate(groups):
        color = colors(gi % colors.N)
        for r in g.runs:
            pts = sorted(histories.get(r.run_id, ()))
            if not pts:
                continue
            xs, ys = [s for s, _ in pts], [100 * v for _, v in pts]
            ax.plot(xs, ys, "--" if r.stopped_early else "-", marker="o", ms=2, color=color, alpha=0.8)
            if r.stopped_early:
                ax.plot(xs[-1:], ys[-1:], "x", ms=8, mew=2, color=color)
        if g in legend:
            handles.append(Line2D([], [], color=color, marker="o", ms=3))
    if stopped:
        handles.append(Line2D([], [], color="grey", ls="--", marker="x", ms=7))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} %")
    more = f"; legend: first {max_legend} of {len(groups)} groups" if len(groups) > max_legend else ""
    ax.set_title(f"learning curves ({metric}; one line per run, colour per group{more})", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_below(fig, handles, entries)
    return fig


def plot_accuracy_vs_sparsity(groups: Sequence[Group], path: Path) -> Path:
    return save(accuracy_vs_sparsity_figure(groups), path)


def plot_accuracy_vs_cost(groups: Sequence[Group], columns: Sequence[str], path: Path,
                          cost: str = "train_time_s") -> Path:
    return save(accuracy_vs_cost_figure(groups, columns, cost), path)


def plot_parallel_coordinates(groups: Sequence[Group], columns: Sequence[str], path: Path) -> Path:
    return save(parallel_coordinates_figure(groups, columns), path)


def plot_learning_curves(groups: Sequence[Group], columns: Sequence[str],
                         histories: Mapping[str, Sequence[tuple[int, float]]], path: Path,
                         metric: str = "test_acc") -> Path:
    return save(learning_curves_figure(groups, columns, histories, metric), path)
