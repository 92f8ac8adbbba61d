"""Sweeps: a YAML spec in ``tune/`` -> Ray Tune + Optuna (+ ASHA) -> one MLflow child run per trial.

One idea per module:

- ``spec``: the spec's layout and its validation (``load_spec``, ``SweepSpec``);
- ``trainable``: one Tune trial = one run of the base config with the sampled values;
- ``tune``: search space, resources, Optuna's searcher, a new or restored ``Tuner``;
- ``study``: the Optuna study's storage (opened by ``optuna-dashboard`` and
  ``optuna.load_study``), Optuna's importance and plots;
- ``progress``: the driver's progress bar and lines (stderr), MLflow status of lost trials;
- ``models``: the best trial's model registered with the alias ``best``;
- ``report``: leaderboard, best config, the parent run's summary;
- ``run``: ``run_sweep``, which ties them together.
"""

from typing import Any

from zosam.sweep.report import SweepResult
from zosam.sweep.spec import (
    DISTRIBUTIONS,
    OBJECTIVE_METRICS,
    SPEC_KEYS,
    SweepSpec,
    check_cluster_can_run,
    load_spec,
    trial_resources,
)
from zosam.sweep.trainable import trial_function

__all__ = ["DISTRIBUTIONS", "OBJECTIVE_METRICS", "SPEC_KEYS", "SweepResult", "SweepSpec", "check_cluster_can_run",
           "load_spec", "run_sweep", "trial_function", "trial_resources"]


def __getattr__(name: str) -> Any:
    # run_sweep brings Ray Tune in (its callback subclasses Tune's): imported on first use, so
    # validating a spec stays light.
    if name == "run_sweep":
        from zosam.sweep.run import run_sweep

        return run_sweep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
