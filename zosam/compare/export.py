"""The comparison as a person reads it (text and Markdown tables) and as data (CSV).

People get meaningful digits: hyperparameters to the fewest significant digits (at least
three) that keep different values apart, accuracies in percent with two decimals and
``± std`` over seeds, times to three significant digits. The CSV files keep raw values.
Runs stopped early are shown with their last accuracy and its epoch, labelled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from zosam.compare.group import HYPER_KEYS, STAT_METRICS, Group
from zosam.compare.records import EPOCH_METRIC, HEADLINE
from zosam.tables import distinct_digits, markdown_table, mean_pm, sig

#: Key columns always shown (the others only where they vary).
FIXED_COLUMNS = ("optimizer", "host", "density", *HYPER_KEYS)
STOPPED_HEADER = "stopped early: last acc % @ epoch"

Formats = dict[str, dict[str, str]]


def short(column: str) -> str:
    """``optimizer.rho`` -> ``rho``: the searched radius and ZO parameters by their own names."""
    return column.removeprefix("optimizer.") if column in HYPER_KEYS else column


def display_columns(groups: Sequence[Group], columns: Sequence[str]) -> list[str]:
    """Key columns shown: the fixed six always, the others only where they vary."""
    return [c for c in columns if c in FIXED_COLUMNS or len({g.value(c) for g in groups}) > 1]


def value_formats(groups: Sequence[Group], columns: Sequence[str]) -> Formats:
    """``{column: {raw: shown}}``: numbers to the fewest significant digits that keep them apart."""
    return {c: distinct_digits(g.value(c) for g in groups) for c in columns}


def shown(g: Group, column: str, formats: Formats) -> str:
    """A group's key value as displayed (``-`` where absent, e.g. rho of SGD)."""
    v = g.value(column)
    return "-" if v is None else formats.get(column, {}).get(v, v)


def _num(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else sig(x, 3)


def stopped_cell(g: Group) -> str:
    """``12.00 @ 3`` per run stopped early: its last test accuracy (%) and that epoch."""
    cells = []
    for r in g.stopped_early:
        acc = r.metrics.get(EPOCH_METRIC)
        cells.append(f"{'-' if acc is None else f'{100 * acc:.2f}'} @ {r.last_epoch or '?'}")
    return ", ".join(cells) or "-"


def table_rows(groups: Sequence[Group], columns: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the comparison table (accuracies in percent)."""
    cols = display_columns(groups, columns)
    formats = value_formats(groups, cols)
    corrupt = any("corrupt_acc_mean" in r.metrics for g in groups for r in g.runs)
    stopped = any(g.stopped_early for g in groups)
    header = [short(c) for c in cols] + ["n seeds", "final acc % (mean ± std)", "best-epoch acc %"]
    header += ["corrupt acc % (mean ± std)"] if corrupt else []
    header += ["wall time s", "backward passes", "images/s"]
    header += [STOPPED_HEADER] if stopped else []
    rows = []
    for g in groups:
        n, total = len(g.completed), len(g.runs)
        row = [shown(g, c, formats) for c in cols]
        row += [str(n) if n == total else f"{n} (of {total} runs)",
                mean_pm(g.mean(HEADLINE), g.std(HEADLINE), scale=100), mean_pm(g.mean("best_test_acc"), scale=100)]
        if corrupt:
            row.append(mean_pm(g.mean("corrupt_acc_mean"), g.std("corrupt_acc_mean"), scale=100))
        row += [_num(g.mean("wall_time_s")), _num(g.mean("passes_backward")), _num(g.mean("images_per_s"))]
        row += [stopped_cell(g)] if stopped else []
        rows.append(row)
    return header, rows


def format_markdown(header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> str:
    """The table as Markdown, with a title and what the columns mean."""
    out = [f"# {title}", ""] if title else []
    notes = ["", "final acc: test accuracy after the last epoch (the headline), mean ± sample std over seeds. "
             "best-epoch acc: the best test accuracy over epochs, mean over seeds (optimistic: "
             "chosen on the test set)."]
    if STOPPED_HEADER in header:
        notes.append("stopped early: trials a scheduler stopped before their last epoch (not in the means), "
                     "each with its last test accuracy and that epoch.")
    return "\n".join(out) + ("\n" if out else "") + markdown_table(header, rows) + "\n".join(notes) + "\n"


def group_csv_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One dict per group: key columns, counts, and mean/std/95 % interval of every summary metric (raw)."""
    rows = []
    for g in groups:
        row: dict[str, Any] = dict(g.key)
        row.update(n_runs=len(g.runs), n_seeds=len(g.completed), n_stopped_early=len(g.stopped_early),
                   seeds=" ".join(g.seeds))
        for m in STAT_METRICS:
            s = g.stats(m)
            row[f"{m}_mean"] = s.mean
            row[f"{m}_std"] = math.nan if s.std is None else s.std
            row[f"{m}_ci95"] = math.nan if s.ci95 is None else s.ci95
        row["run_ids"] = " ".join(r.run_id for r in g.runs)
        rows.append(row)
    return rows


def run_csv_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One dict per run (the data behind the groups), with its status and last accuracy."""
    rows = []
    for gi, g in enumerate(groups):
        for r in g.runs:
            row: dict[str, Any] = {"group": gi, "run_id": r.run_id, "run_name": r.name, "seed": r.seed,
                                   "status": r.tags.get("zosam.status", "")}
            row.update(dict(g.key))
            row.update({m: r.metrics.get(m, math.nan) for m in STAT_METRICS})
            row.update(last_test_acc=r.metrics.get(EPOCH_METRIC, math.nan), last_epoch=r.last_epoch)
            rows.append(row)
    return rows
