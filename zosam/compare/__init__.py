"""``zosam compare``: select MLflow runs, group them over seeds, print, export and plot.

One idea per module: ``records`` (a run as plain data), ``selection`` (which runs, read
from MLflow), ``group`` (groups over seeds and their statistics), ``export`` (tables for
people, CSV for programs), ``plots`` (the figures), ``command`` (the command: reads
always, writes a comparison run only with ``--log``).
"""

from zosam.compare.command import COST_METRICS, CompareResult, compare, compare_main, log_comparison
from zosam.compare.export import display_columns, format_markdown, group_csv_rows, run_csv_rows, table_rows
from zosam.compare.group import HYPER_KEYS, STAT_METRICS, TAG_KEYS, Group, group_runs, key_columns, varying_params
from zosam.compare.plots import (
    plot_accuracy_vs_cost,
    plot_accuracy_vs_sparsity,
    plot_learning_curves,
    plot_parallel_coordinates,
)
from zosam.compare.records import HEADLINE, RunRecord
from zosam.compare.selection import NothingSelected, Selection, find_sweep_parent, parse_tags, select_runs

__all__ = [
    "COST_METRICS", "HEADLINE", "HYPER_KEYS", "STAT_METRICS", "TAG_KEYS", "CompareResult", "Group",
    "NothingSelected", "RunRecord", "Selection", "compare", "compare_main", "display_columns",
    "find_sweep_parent", "format_markdown", "group_csv_rows", "group_runs", "key_columns", "log_comparison",
    "parse_tags", "plot_accuracy_vs_cost", "plot_accuracy_vs_sparsity", "plot_learning_curves",
    "plot_parallel_coordinates", "run_csv_rows", "select_runs", "table_rows", "varying_params",
]
