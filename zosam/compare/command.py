"""``zosam compare``: select, group, print; export on request; log a comparison run only when asked.

Looking is not writing: a plain ``zosam compare`` reads the tracking store and changes
nothing in it. ``--out`` writes the CSV, Markdown and PNG exports to a folder; ``--log``
also records them as a run tagged ``zosam.role=comparison``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from zosam.compare.export import format_markdown, group_csv_rows, run_csv_rows, table_rows
from zosam.compare.group import Group, group_runs, key_columns
from zosam.compare.plots import (
    plot_accuracy_vs_cost,
    plot_accuracy_vs_sparsity,
    plot_learning_curves,
    plot_parallel_coordinates,
)
from zosam.compare.records import RunRecord
from zosam.compare.selection import ROLE_TAG, NothingSelected, Selection, metric_histories, parse_tags, select_runs
from zosam.tables import text_table, write_csv
from zosam.validate import ConfigError, choice

COST_METRICS = ("train_time_s", "wall_time_s", "passes_backward")


@dataclass
class CompareResult:
    groups: list[Group]
    key_columns: list[str]
    table: str
    files: list[Path]
    comparison_run_id: str | None


def _comparison_experiment(client, runs: Sequence[RunRecord]) -> str:
    """Where the comparison run goes: the selected runs' experiment if they share one,
    else ``zosam-comparisons``."""
    ids = {r.experiment_id for r in runs}
    return client.get_experiment(ids.pop()).name if len(ids) == 1 else "zosam-comparisons"


def log_comparison(uri: str, selection: Selection, runs: Sequence[RunRecord], groups: Sequence[Group],
                   files: Sequence[Path]) -> str:
    """A run tagged ``zosam.role=comparison`` holding the exports as artifacts."""
    from zosam.tracking import RunLogger, client

    experiment = _comparison_experiment(client(uri), runs)
    desc = selection.describe()
    logger = RunLogger(uri, experiment, f"compare: {desc}"[:250],
                       tags={ROLE_TAG: "comparison", "zosam.selection": desc[:5000],
                             "mlflow.note.content": f"zosam compare over {len(runs)} runs ({desc})"})
    logger.log_params({"selection.experiment": selection.experiment, "selection.sweep": selection.sweep,
                       "selection.filter": selection.filter,
                       "selection.tags": " ".join(f"{k}={v}" for k, v in selection.tags.items()) or None})
    logger.log_metrics({"n_runs": len(runs), "n_groups": len(groups)})
    for f in files:
        logger.log_file(f, "plots" if f.suffix == ".png" else None)
    logger.client.set_terminated(logger.run_id, status="FINISHED")
    return logger.run_id


def write_exports(folder: Path, client, selection: Selection, runs: Sequence[RunRecord], groups: Sequence[Group],
                  columns: Sequence[str], header: Sequence[str], rows: Sequence[Sequence[str]],
                  cost: str) -> list[Path]:
    """CSV (groups, runs), Markdown and the four plots in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / "comparison.md"
    md.write_text(format_markdown(header, rows, f"zosam compare: {selection.describe()}"))
    return [
        write_csv(folder / "comparison.csv", group_csv_rows(groups)),
        write_csv(folder / "runs.csv", run_csv_rows(groups)),
        md,
        plot_accuracy_vs_sparsity(groups, folder / "accuracy_vs_sparsity.png"),
        plot_accuracy_vs_cost(groups, columns, folder / "accuracy_vs_cost.png", cost),
        plot_parallel_coordinates(groups, columns, folder / "parallel_coordinates.png"),
        plot_learning_curves(groups, columns, metric_histories(client, runs), folder / "learning_curves.png"),
    ]


def compare(selection: Selection, *, tracking_uri: str | None = None, out: str | Path | None = None,
            log: bool = False, cost: str = "train_time_s", echo: Callable[[str], None] | None = print,
            ) -> CompareResult:
    """Select, group, print; write CSV/Markdown/PNG to ``out``; with ``log``, record them as a
    comparison run (the only write to the tracking store).

    Raises:
        NothingSelected: the selection matched no runs (the message names it).
    """
    from zosam.tracking import check_tracking_uri, default_tracking_uri
    from zosam.tracking import client as make_client
    from zosam.validate import check_writable_dir

    choice("--cost", cost, COST_METRICS)
    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        # MLflow would silently create an empty store here.
        raise NothingSelected(f"no MLflow store at {uri} (set --tracking-uri or $MLFLOW_TRACKING_URI)")
    check_tracking_uri("--tracking-uri", uri)  # a server that does not answer: seconds, not minutes
    if out is not None:
        if Path(out).exists() and not Path(out).is_dir():
            raise ConfigError(f"--out={str(out)!r} is an existing file; give a folder (new or existing)")
        check_writable_dir("--out", out)
    c = make_client(uri)
    runs = select_runs(c, selection)
    columns = key_columns(runs)
    groups = group_runs(runs, columns)
    header, rows = table_rows(groups, columns)
    text = text_table(header, rows)
    if echo:
        done = sum(len(g.completed) for g in groups)
        stopped = sum(len(g.stopped_early) for g in groups)
        echo(f"{len(runs)} runs ({done} completed" + (f", {stopped} stopped early" if stopped else "")
             + f") in {len(groups)} groups; selection: {selection.describe()}")
        echo(text)
    files: list[Path] = []
    comparison_id = None
    if out is None and not log:
        return CompareResult(groups, columns, text, files, None)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out) if out is not None else Path(tmp)
        files = write_exports(folder, c, selection, runs, groups, columns, header, rows, cost)
        if log:
            comparison_id = log_comparison(uri, selection, runs, groups, files)
            if echo:
                echo(f"comparison run {comparison_id} (artifacts: {', '.join(f.name for f in files)})")
        if out is None:
            files = []
        elif echo:
            echo(f"wrote {', '.join(str(f) for f in files)}")
    return CompareResult(groups, columns, text, files, comparison_id)


def compare_main(args: argparse.Namespace) -> int:
    """``zosam compare``: 0 on success, 1 when the selection matches nothing."""
    selection = Selection(experiment=args.experiment, sweep=args.sweep, filter=args.filter,
                          tags=parse_tags(args.tag))
    try:
        compare(selection, tracking_uri=args.tracking_uri, out=args.out, log=getattr(args, "log", False),
                cost=getattr(args, "cost", "train_time_s"))
    except NothingSelected as e:
        print(f"zosam compare: {e}", file=sys.stderr)
        return 1
    return 0
