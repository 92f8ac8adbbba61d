"""Which MLflow runs to compare, read from the store.

Selection (all given criteria must hold): an experiment, a sweep (its parent run, by the
sweep's name or the parent's run id; the rows are the parent's children), tags, and an
MLflow filter string. Sweep parents (``zosam.role=sweep``) and earlier comparison runs
(``zosam.role=comparison``) are never rows. Only ``MlflowClient`` calls touch the store,
so a local sqlite store and a remote tracking server work the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from zosam.compare.records import EPOCH_METRIC, RunRecord
from zosam.validate import ConfigError, show

ROLE_TAG = "zosam.role"
EXCLUDED_ROLES = ("sweep", "comparison")


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


class NothingSelected(LookupError):
    """The selection matched no runs (``zosam compare`` exits with status 1)."""


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
    """Every run matching ``filter_string`` (all pages); bad filters become a ConfigError."""
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
    """The runs the selection names, without sweep parents and comparison runs; runs stopped
    early carry the epoch of their last accuracy (``RunRecord.last_epoch``).

    Raises:
        NothingSelected: with a message naming the selection when nothing matches.
        ConfigError: for a filter MLflow rejects.
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
    for r in runs:
        if r.stopped_early:  # the latest value is in the run's data; its epoch only in the history
            steps = [m.step for m in client.get_metric_history(r.run_id, EPOCH_METRIC)]
            r.last_epoch = max(steps) if steps else None
    return sorted(runs, key=lambda r: r.name)


def metric_histories(client, runs: Iterable[RunRecord],
                     metric: str = EPOCH_METRIC) -> dict[str, list[tuple[int, float]]]:
    """``{run_id: [(step, value), ...]}`` from MLflow's metric history."""
    return {r.run_id: [(m.step, m.value) for m in client.get_metric_history(r.run_id, metric)] for r in runs}
