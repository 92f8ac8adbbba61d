"""``zosam compare``: select MLflow runs, group them over seeds, print, export and plot.

Selection (all given criteria must hold): an experiment, a sweep (its parent run, by the
sweep's name or the parent's run id; the rows are the parent's children), tags, and an
MLflow filter string. Sweep parents (``zosam.role=sweep``) and earlier comparison runs
(``zosam.role=comparison``) are never rows.

Groups: runs that differ only in their seed (and in bookkeeping such as run name, device
or checkpoint folder) form one group. The key is optimizer, host, density, dataset and
model (tags, ``docs/design.md``), rho, mu, q, and every other run-config param whose value
differs among the selected runs. Only runs that reached their end (they carry
``final_test_acc``) enter the statistics; stopped-early, failed and running ones are
counted in ``n_runs`` only.

Only ``MlflowClient`` calls touch the store, so a local sqlite store and a remote
tracking server work the same way.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zosam.pareto import pareto_front
from zosam.validate import ConfigError, choice, show

ROLE_TAG = "zosam.role"
EXCLUDED_ROLES = ("sweep", "comparison")
TAG_KEYS = ("optimizer", "host", "density", "dataset", "model")  # as ``zosam.<key>`` tags
HYPER_KEYS = ("optimizer.rho", "optimizer.mu", "optimizer.q")
# Params that do not change what is trained (or are the seed we group over).
BOOKKEEPING = {"name", "seed", "device", "data.cache_dir", "data.data_dir", "data.archive", "data.num_workers",
               "eval.corruptions", "eval.diagnostics_steps"}
BOOKKEEPING_PREFIXES = ("checkpoint.", "tracking.")
# Params that the tags already carry (``zosam.runner.run_tags``).
TAGGED_PARAMS = {"optimizer.name", "sparse.method", "sparse.density", "data.name", "model.name"}
# Summary metrics averaged per group: (metric, column label, formatter kind).
STAT_METRICS = ("final_test_acc", "best_test_acc", "corrupt_acc_mean", "wall_time_s", "train_time_s",
                "passes_backward", "images_per_s", "realised_density")
COST_METRICS = ("train_time_s", "wall_time_s", "passes_backward")
HEADLINE = "final_test_acc"


@dataclass
class Selection:
    """Which runs to compare; every given criterion must hold."""

    experiment: str | None = None
    sweep: str | None = None
    filter: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        parts = []
        if self.experiment:
            parts.append(f"experiment {self.experiment!r}")
        if self.sweep:
            parts.append(f"sweep {self.sweep!r}")
        parts += [f"tag {k}={v!r}" for k, v in self.tags.items()]
        if self.filter:
            parts.append(f"filter {self.filter!r}")
        return ", ".join(parts) or "all experiments"


@dataclass
class RunRecord:
    """One MLflow run as plain data (what the pure functions below work on)."""

    run_id: str
    name: str
    experiment_id: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]

    @property
    def completed(self) -> bool:
        return HEADLINE in self.metrics


@dataclass
class Group:
    """Runs that differ only in their seed."""

    key: tuple[tuple[str, str | None], ...]
    runs: list[RunRecord]

    @property
    def completed(self) -> list[RunRecord]:
        return [r for r in self.runs if r.completed]

    def value(self, column: str) -> str | None:
        return dict(self.key).get(column)

    def mean(self, metric: str) -> float:
        xs = [r.metrics[metric] for r in self.completed if metric in r.metrics]
        return statistics.fmean(xs) if xs else math.nan

    def std(self, metric: str) -> float:
        """Sample standard deviation over seeds (n - 1 in the denominator); NaN below two runs."""
        xs = [r.metrics[metric] for r in self.completed if metric in r.metrics]
        return statistics.stdev(xs) if len(xs) >= 2 else math.nan

    @property
    def seeds(self) -> list[str]:
        return sorted({r.tags.get("zosam.seed", r.params.get("seed", "?")) for r in self.completed},
                      key=_sort_key)


@dataclass
class CompareResult:
    groups: list[Group]
    key_columns: list[str]
    table: str
    files: list[Path]
    comparison_run_id: str | None


class NothingSelected(LookupError):
    """The selection matched no runs (``zosam compare`` exits with status 1)."""


# ----------------------------------------------------------------------------- selection

def parse_tags(items: Sequence[str]) -> dict[str, str]:
    """``["host=rigl", "zosam.seed=0"]`` -> tags; a key without a dot means ``zosam.<key>``."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--tag {show(item)} is invalid; expected KEY=VALUE, e.g. host=rigl")
        key = key.strip()
        if "`" in key:
            raise ConfigError(f"--tag {show(item)} is invalid; a tag key holds no backtick")
        out[key if "." in key else f"zosam.{key}"] = value
    return out


def _quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"tag value {show(value)} holds both quote characters; use --filter instead")


def _tag_clause(key: str, value: str) -> str:
    return f"tags.`{key}` = {_quote(value)}"


def _and(*clauses: str | None) -> str:
    return " and ".join(f"{c}" for c in clauses if c)


def _search(client, experiment_ids: list[str], filter_string: str, what: str) -> list:
    """Every run matching ``filter_string`` (all pages); bad filters become a ValueError."""
    from mlflow.exceptions import MlflowException

    runs, token = [], None
    while True:
        try:
            page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                      page_token=token)
        except MlflowException as e:
            raise ConfigError(f"{what}: MLflow rejected the filter {filter_string!r}: {e.message}") from None
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment_ids(client, name: str | None) -> list[str]:
    if name is not None:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise NothingSelected(f"no experiment named {name!r} in this MLflow store")
        return [exp.experiment_id]
    ids, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def find_sweep_parent(client, sweep: str, experiment_ids: list[str]):
    """The parent run of a sweep: ``sweep`` is a run id or a sweep name (the newest parent
    wins when a name was used by several sweeps; the message names the others)."""
    from mlflow.exceptions import MlflowException

    if len(sweep) == 32 and all(c in "0123456789abcdef" for c in sweep):
        try:
            return client.get_run(sweep)
        except MlflowException:
            pass  # not a run id after all: try it as a name
    parents = _search(client, experiment_ids,
                      _and(_tag_clause("zosam.sweep", sweep), _tag_clause(ROLE_TAG, "sweep")), "--sweep")
    if not parents:
        raise NothingSelected(f"no sweep named {sweep!r} (no run with tags zosam.sweep={sweep!r} and "
                              f"zosam.role='sweep') and no run with that id")
    parents.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    if len(parents) > 1:
        others = ", ".join(p.info.run_id for p in parents[1:])
        print(f"zosam compare: {len(parents)} sweeps are named {sweep!r}; using the newest "
              f"(parent run {parents[0].info.run_id}); others: {others}", file=sys.stderr)
    return parents[0]


def to_record(run) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.run_name or run.data.tags.get("mlflow.runName", ""),
                     run.info.experiment_id, dict(run.data.tags), dict(run.data.params), dict(run.data.metrics))


def select_runs(client, selection: Selection) -> list[RunRecord]:
    """The runs the selection names, without sweep parents and comparison runs.

    Raises:
        NothingSelected: with a message naming the selection when nothing matches.
        ValueError: for a filter MLflow rejects.
    """
    experiment_ids = _experiment_ids(client, selection.experiment)
    clauses = [selection.filter]  # MLflow's grammar has AND only (no parentheses, no OR)
    clauses += [_tag_clause(k, v) for k, v in selection.tags.items()]
    if selection.sweep:
        parent = find_sweep_parent(client, selection.sweep, experiment_ids)
        clauses.append(_tag_clause("mlflow.parentRunId", parent.info.run_id))
        experiment_ids = sorted(set(experiment_ids) | {parent.info.experiment_id})
    runs = [to_record(r) for r in _search(client, experiment_ids, _and(*clauses), "--filter")]
    runs = [r for r in runs if r.tags.get(ROLE_TAG) not in EXCLUDED_ROLES]
    if not runs:
        raise NothingSelected(f"no runs match the selection: {selection.describe()}")
    return sorted(runs, key=lambda r: r.name)


# ----------------------------------------------------------------------------- grouping

def _sort_key(v: Any) -> tuple:
    """Numbers before strings, numbers by value (so '10' sorts after '9')."""
    if v is None:
        return (2, 0.0, "")
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def _is_bookkeeping(key: str) -> bool:
    return key in BOOKKEEPING or key in TAGGED_PARAMS or key.startswith(BOOKKEEPING_PREFIXES)


def varying_params(runs: Iterable[RunRecord]) -> list[str]:
    """Run-config params whose value differs among ``runs`` (absent counts as a value),
    excluding the seed and bookkeeping. These are the searched hyperparameters."""
    runs = list(runs)
    keys = sorted({k for r in runs for k in r.params})
    return [k for k in keys if not _is_bookkeeping(k) and len({r.params.get(k) for r in runs}) > 1]


def key_columns(runs: Sequence[RunRecord]) -> list[str]:
    """Group-key columns: the tags, rho/mu/q, then the other params that differ."""
    return [*TAG_KEYS, *HYPER_KEYS, *(k for k in varying_params(runs) if k not in HYPER_KEYS)]


def _key_value(run: RunRecord, column: str) -> str | None:
    if column in TAG_KEYS:
        return run.tags.get(f"zosam.{column}")
    v = run.params.get(column)
    return None if v in (None, "None") else v


def group_runs(runs: Sequence[RunRecord], columns: Sequence[str] | None = None) -> list[Group]:
    """Group over seeds; groups sorted by dataset, model, optimizer, host, density (high first)."""
    columns = list(columns) if columns is not None else key_columns(runs)
    groups: dict[tuple, Group] = {}
    for r in runs:
        key = tuple((c, _key_value(r, c)) for c in columns)
        groups.setdefault(key, Group(key, [])).runs.append(r)

    def order(g: Group) -> tuple:
        d = dict(g.key)
        density = _sort_key(d.get("density"))
        return (d.get("dataset") or "", d.get("model") or "", d.get("optimizer") or "", d.get("host") or "",
                (density[0], -density[1], density[2]), *(_sort_key(v) for _, v in g.key))

    return sorted(groups.values(), key=order)


# ----------------------------------------------------------------------------- tables

def _short(column: str) -> str:
    return column.removeprefix("optimizer.") if column in HYPER_KEYS else column


def _pct(mean: float, std: float | None = None) -> str:
    if math.isnan(mean):
        return "-"
    s = f"{100 * mean:.2f}"
    if std is not None:
        s += " ± " + ("n/a" if math.isnan(std) else f"{100 * std:.2f}")
    return s


def _num(x: float, digits: int = 1) -> str:
    return "-" if math.isnan(x) else f"{x:,.{digits}f}"


def display_columns(groups: Sequence[Group], columns: Sequence[str]) -> list[str]:
    """Key columns shown: the issue's fixed six always, the others only where they vary."""
    fixed = ("optimizer", "host", "density", *HYPER_KEYS)
    shown = []
    for c in columns:
        if c in fixed or len({g.value(c) for g in groups}) > 1:
            shown.append(c)
    return shown


def table_rows(groups: Sequence[Group], columns: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the comparison table (accuracies in percent)."""
    shown = display_columns(groups, columns)
    corrupt = any("corrupt_acc_mean" in r.metrics for g in groups for r in g.runs)
    header = [_short(c) for c in shown] + ["n seeds", "final acc % (mean ± std)", "best-epoch acc %"]
    header += ["corrupt acc % (mean ± std)"] if corrupt else []
    header += ["wall time s", "backward passes", "images/s"]
    rows = []
    for g in groups:
        n, total = len(g.completed), len(g.runs)
        row = [g.value(c) or "-" for c in shown]
        row += [str(n) if n == total else f"{n} (of {total} runs)",
                _pct(g.mean(HEADLINE), g.std(HEADLINE)), _pct(g.mean("best_test_acc"))]
        row += [_pct(g.mean("corrupt_acc_mean"), g.std("corrupt_acc_mean"))] if corrupt else []
        row += [_num(g.mean("wall_time_s")), _num(g.mean("passes_backward"), 0), _num(g.mean("images_per_s"))]
        rows.append(row)
    return header, rows


def format_text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_markdown(header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> str:
    out = [f"# {title}", ""] if title else []
    out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    out += ["", "final acc: test accuracy after the last epoch (the headline), mean ± sample std over seeds. "
            "best-epoch acc: the best test accuracy over epochs, mean over seeds (optimistic: "
            "chosen on the test set)."]
    return "\n".join(out) + "\n"


def group_csv_rows(groups: Sequence[Group], columns: Sequence[str]) -> list[dict[str, Any]]:
    """One dict per group: key columns, counts, and mean/std of every summary metric (raw values)."""
    rows = []
    for g in groups:
        row: dict[str, Any] = dict(g.key)
        row.update(n_runs=len(g.runs), n_seeds=len(g.completed), seeds=" ".join(g.seeds))
        for m in STAT_METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = g.mean(m), g.std(m)
        row["run_ids"] = " ".join(r.run_id for r in g.runs)
        rows.append(row)
    return rows


def run_csv_rows(groups: Sequence[Group], columns: Sequence[str]) -> list[dict[str, Any]]:
    """One dict per run (the data behind the groups)."""
    rows = []
    for gi, g in enumerate(groups):
        for r in g.runs:
            row: dict[str, Any] = {"group": gi, "run_id": r.run_id, "run_name": r.name,
                                   "seed": r.tags.get("zosam.seed", r.params.get("seed")),
                                   "status": r.tags.get("zosam.status", "")}
            row.update(dict(g.key))
            row.update({m: r.metrics.get(m, math.nan) for m in STAT_METRICS})
            rows.append(row)
    return rows


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


# ----------------------------------------------------------------------------- plots

def _label(g: Group, columns: Sequence[str]) -> str:
    parts = [f"{_short(c)}={v}" for c, v in g.key if c != "optimizer" and v is not None and c in columns]
    return f"{g.value('optimizer')} " + " ".join(parts)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _density(g: Group) -> float:
    try:
        return float(g.value("density") or "nan")
    except ValueError:
        return math.nan


def plot_accuracy_vs_sparsity(groups: Sequence[Group], path: Path) -> Path:
    """Final accuracy (mean ± std over seeds) against sparsity = 1 - density, one series per
    optimizer (and host where several); the line joins each series' best group per sparsity."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    hosts = {g.value("host") for g in groups}
    series: dict[str, list[Group]] = {}
    for g in groups:
        if g.completed:
            name = g.value("optimizer") or "?"
            series.setdefault(name + (f" / {g.value('host')}" if len(hosts) > 1 else ""), []).append(g)
    for name, gs in sorted(series.items()):
        xs = [1 - _density(g) for g in gs]
        ys = [100 * g.mean(HEADLINE) for g in gs]
        es = [0.0 if math.isnan(s) else 100 * s for s in (g.std(HEADLINE) for g in gs)]
        bar = ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, alpha=0.6)
        best: dict[float, float] = {}
        for x, y in zip(xs, ys, strict=True):
            best[x] = max(best.get(x, -math.inf), y)
        bx = sorted(best)
        ax.plot(bx, [best[x] for x in bx], "-", color=bar[0].get_color(), label=name)
    ax.set_xlabel("sparsity (1 - density)")
    ax.set_ylabel("final test accuracy %")
    ax.set_title("accuracy vs. sparsity (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_vs_cost(groups: Sequence[Group], columns: Sequence[str], path: Path,
                          cost: str = "train_time_s") -> Path:
    """Final accuracy against a training cost (group means), with the Pareto front marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(g.mean(cost), 100 * g.mean(HEADLINE), g) for g in groups]
    pts = [p for p in pts if not (math.isnan(p[0]) or math.isnan(p[1]))]
    by_opt: dict[str, list] = {}
    for p in pts:
        by_opt.setdefault(p[2].value("optimizer") or "?", []).append(p)
    for name, ps in sorted(by_opt.items()):
        ax.plot([p[0] for p in ps], [p[1] for p in ps], "o", alpha=0.7, label=name)
    front = sorted((pts[i] for i in pareto_front([(p[0], p[1]) for p in pts], ("min", "max"))),
                   key=lambda p: p[0])  # cheapest first, for the step line
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], "r--", where="post", lw=1)
        ax.plot([p[0] for p in front], [p[1] for p in front], "o", mfc="none", mec="red", ms=11,
                label="Pareto front")
        for p in front:
            ax.annotate(_label(p[2], display_columns(groups, columns)), (p[0], p[1]), fontsize=6,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"training cost: {cost} (mean over seeds)")
    ax.set_ylabel("final test accuracy %")
    ax.set_title("accuracy vs. training cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _axis_values(values: Sequence[str | None]) -> tuple[list[float], list[float], list[str]]:
    """Map one hyperparameter's values to [0, 1] for a parallel-coordinates axis.

    Numbers go linearly (log10 when all positive and spanning more than 10x); anything
    else becomes evenly spaced categories. Missing values (``None``: e.g. rho of SGD) sit
    at 0, labelled ``n/a``, with the numbers then in [0.15, 1].
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
        tpos, tlab = [place(t) for t in ticks], [f"{t:g}" for t in ticks]
        if base:
            tpos, tlab = [0.0, *tpos], ["n/a", *tlab]
        return pos, tpos, tlab
    cats = sorted({"n/a" if v is None else str(v) for v in values}, key=_sort_key)
    step = 1 / max(len(cats) - 1, 1)
    return ([cats.index("n/a" if v is None else str(v)) * step for v in values],
            [i * step for i in range(len(cats))], cats)


def plot_parallel_coordinates(groups: Sequence[Group], columns: Sequence[str], path: Path) -> Path:
    """One line per completed run through the varying hyperparameters and its final
    accuracy, coloured by accuracy."""
    plt = _plt()
    runs = [(r, g) for g in groups for r in g.completed]
    axes = [c for c in columns if len({g.value(c) for g in groups}) > 1] or ["optimizer"]
    accs = [100 * r.metrics[HEADLINE] for r, _ in runs]
    columns_pos, ticks = [], []
    for c in axes:
        pos, tpos, tlab = _axis_values([g.value(c) for _, g in runs])
        columns_pos.append(pos)
        ticks.append((tpos, tlab))
    apos, atpos, atlab = _axis_values([f"{a:.6g}" for a in accs]) if accs else ([], [], [])
    columns_pos.append(apos)
    ticks.append((atpos, [f"{float(t):.1f}" for t in atlab]))
    names = [_short(c) for c in axes] + ["final acc %"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(names)), 4))
    cmap = plt.get_cmap("viridis")
    lo, hi = (min(accs), max(accs)) if accs else (0, 1)
    for i, a in enumerate(accs):
        ax.plot(range(len(names)), [col[i] for col in columns_pos], "-o", ms=3, alpha=0.7,
                color=cmap((a - lo) / (hi - lo) if hi > lo else 0.5))
    for x, (tpos, tlab) in enumerate(ticks):
        ax.axvline(x, color="black", lw=0.8)
        for p, t in zip(tpos, tlab, strict=True):
            ax.text(x + 0.03, p, t, fontsize=7, va="center")
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("searched hyperparameters vs. final accuracy (one line per run)")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi))
    fig.colorbar(sm, ax=ax, label="final test accuracy %")
    return _save(fig, path)


def plot_learning_curves(groups: Sequence[Group], columns: Sequence[str],
                         histories: Mapping[str, Sequence[tuple[int, float]]], path: Path,
                         metric: str = "test_acc") -> Path:
    """``metric`` per epoch for every selected run; one colour per group (seeds share it)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    shown = display_columns(groups, columns)
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    for gi, g in enumerate(groups):
        color = colors(gi % colors.N)
        for ri, r in enumerate(g.runs):
            pts = sorted(histories.get(r.run_id, ()))
            if pts:
                ax.plot([s for s, _ in pts], [100 * v for _, v in pts], "-o", ms=2, color=color, alpha=0.8,
                        label=_label(g, shown) if ri == 0 and gi < 20 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} %")
    ax.set_title(f"learning curves ({metric}; one line per run, colour per group)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_histories(client, runs: Iterable[RunRecord], metric: str = "test_acc") -> dict[str, list[tuple[int, float]]]:
    """``{run_id: [(step, value), ...]}`` from MLflow's metric history."""
    return {r.run_id: [(m.step, m.value) for m in client.get_metric_history(r.run_id, metric)] for r in runs}


# ----------------------------------------------------------------------------- the command

def _comparison_experiment(client, selection: Selection, runs: Sequence[RunRecord]) -> str:
    """Where the comparison run goes: the selected runs' experiment if they share one,
    else ``zosam-comparisons``."""
    ids = {r.experiment_id for r in runs}
    return client.get_experiment(ids.pop()).name if len(ids) == 1 else "zosam-comparisons"


def log_comparison(uri: str, selection: Selection, runs: Sequence[RunRecord], groups: Sequence[Group],
                   files: Sequence[Path]) -> str:
    """A run tagged ``zosam.role=comparison`` holding the exports as artifacts."""
    from zosam.tracking import RunLogger, client

    c = client(uri)
    experiment = _comparison_experiment(c, selection, runs)
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


def compare(selection: Selection, *, tracking_uri: str | None = None, out: str | Path | None = None,
            log: bool = True, cost: str = "train_time_s", echo: Callable[[str], None] | None = print,
            ) -> CompareResult:
    """Select, group, print; write CSV/Markdown/PNG to ``out``; log them to a comparison run.

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
    text = format_text_table(header, rows)
    if echo:
        done = sum(len(g.completed) for g in groups)
        echo(f"{len(runs)} runs ({done} completed) in {len(groups)} groups; selection: {selection.describe()}")
        echo(text)
    files: list[Path] = []
    comparison_id = None
    if out is None and not log:
        return CompareResult(groups, columns, text, files, None)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out) if out is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        files = [
            write_csv(folder / "comparison.csv", group_csv_rows(groups, columns)),
            write_csv(folder / "runs.csv", run_csv_rows(groups, columns)),
        ]
        md = folder / "comparison.md"
        md.write_text(format_markdown(header, rows, f"zosam compare: {selection.describe()}"))
        files.append(md)
        files += [
            plot_accuracy_vs_sparsity(groups, folder / "accuracy_vs_sparsity.png"),
            plot_accuracy_vs_cost(groups, columns, folder / "accuracy_vs_cost.png", cost),
            plot_parallel_coordinates(groups, columns, folder / "parallel_coordinates.png"),
            plot_learning_curves(groups, columns, metric_histories(c, runs), folder / "learning_curves.png"),
        ]
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
        compare(selection, tracking_uri=args.tracking_uri, out=args.out, log=not args.no_log,
                cost=getattr(args, "cost", "train_time_s"))
    except NothingSelected as e:
        print(f"zosam compare: {e}", file=sys.stderr)
        return 1
    return 0
