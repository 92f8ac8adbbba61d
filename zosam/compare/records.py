"""The plain data ``zosam compare`` works on: one MLflow run as a ``RunRecord``.

Statuses follow the MLflow naming of ``docs/design.md`` (tag ``zosam.status``): a run that
reached its end carries the headline metric ``final_test_acc``; a trial the scheduler
stopped early carries ``zosam.status = stopped_early`` and its per-epoch ``test_acc``.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADLINE = "final_test_acc"
STATUS_TAG = "zosam.status"
STOPPED_EARLY = "stopped_early"
#: The per-epoch accuracy (MLflow step = epoch): the last value of a run stopped early.
EPOCH_METRIC = "test_acc"


@dataclass
class RunRecord:
    """One MLflow run as plain data (what the pure functions of ``zosam.compare`` work on).

    ``last_epoch``: the step of the run's last ``test_acc`` (read for runs stopped early only).
    """

    run_id: str
    name: str
    experiment_id: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    last_epoch: int | None = None

    @property
    def completed(self) -> bool:
        """The run reached its end (it carries the headline metric)."""
        return HEADLINE in self.metrics

    @property
    def stopped_early(self) -> bool:
        """A scheduler (ASHA) stopped the run before its last epoch."""
        return not self.completed and self.tags.get(STATUS_TAG) == STOPPED_EARLY

    @property
    def seed(self) -> str | None:
        return self.tags.get("zosam.seed", self.params.get("seed"))
