"""Runs that differ only in their seed form one group; its statistics are over seeds.

The key is optimizer, host, density, dataset and model (tags, ``docs/design.md``), rho,
mu, q, and every other run-config param whose value differs among the selected runs
(bookkeeping such as run name, device or checkpoint folder excluded). Only runs that
reached their end (they carry ``final_test_acc``) enter the statistics; runs stopped
early, failed and running ones are counted in ``n_runs`` only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from zosam.compare.records import RunRecord
from zosam.stats import SeedStats, seed_stats

TAG_KEYS = ("optimizer", "host", "density", "dataset", "model")  # as ``zosam.<key>`` tags
HYPER_KEYS = ("optimizer.rho", "optimizer.mu", "optimizer.q")
# Params that do not change what is trained (or are the seed we group over).
BOOKKEEPING = {"name", "seed", "device", "data.cache_dir", "data.data_dir", "data.archive", "data.num_workers",
               "eval.corruptions", "eval.diagnostics_steps"}
BOOKKEEPING_PREFIXES = ("checkpoint.", "tracking.")
# Params that the tags already carry (``zosam.runner.run_tags``).
TAGGED_PARAMS = {"optimizer.name", "sparse.method", "sparse.density", "data.name", "model.name"}
#: Summary metrics averaged per group.
STAT_METRICS = ("final_test_acc", "best_test_acc", "corrupt_acc_mean", "wall_time_s", "train_time_s",
                "passes_backward", "images_per_s", "realised_density")


def sort_key(v: Any) -> tuple:
    """Numbers before strings, numbers by value (so '10' sorts after '9')."""
    if v is None:
        return (2, 0.0, "")
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


@dataclass
class Group:
    """Runs that differ only in their seed."""

    key: tuple[tuple[str, str | None], ...]
    runs: list[RunRecord]

    @property
    def completed(self) -> list[RunRecord]:
        return [r for r in self.runs if r.completed]

    @property
    def stopped_early(self) -> list[RunRecord]:
        return [r for r in self.runs if r.stopped_early]

    def value(self, column: str) -> str | None:
        return dict(self.key).get(column)

    def stats(self, metric: str) -> SeedStats:
        """``metric`` over the completed runs that logged it."""
        return seed_stats(r.metrics[metric] for r in self.completed if metric in r.metrics)

    def mean(self, metric: str) -> float:
        return self.stats(metric).mean

    def std(self, metric: str) -> float:
        """Sample standard deviation over seeds (n - 1 in the denominator); NaN below two runs."""
        std = self.stats(metric).std
        return math.nan if std is None else std

    @property
    def seeds(self) -> list[str]:
        return sorted({r.seed or "?" for r in self.completed}, key=sort_key)


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
        density = sort_key(d.get("density"))
        return (d.get("dataset") or "", d.get("model") or "", d.get("optimizer") or "", d.get("host") or "",
                (density[0], -density[1], density[2]), *(sort_key(v) for _, v in g.key))

    return sorted(groups.values(), key=order)
