"""Tune wiring: the search space, each trial's resources, Optuna's searcher over the sweep's
persisted study, ASHA, and a ``Tuner`` that is new or restored (``--resume``)."""

from __future__ import annotations

from typing import Any

from zosam.config import RunConfig
from zosam.sweep.spec import SweepSpec


def distribution(dist: dict[str, Any]):
    """A spec distribution (``{loguniform: [lo, hi]}``, ...) as a Tune search domain."""
    from ray import tune

    (kind, args), = dist.items()
    if kind == "choice":
        return tune.choice(args)
    if kind == "randint":
        return tune.randint(args[0], args[1] + 1)  # Tune's upper bound is exclusive
    return getattr(tune, kind)(*args)


def param_space(spec: SweepSpec, ctx: dict[str, Any]) -> dict[str, Any]:
    """The space Tune samples, plus the fixed context every trial reads (``_zosam``)."""
    return {**{k: distribution(d) for k, d in spec.space.items()}, "_zosam": ctx}


def placement(spec: SweepSpec):
    """What one trial holds: its own CPUs/GPUs, or a placement group when it drives Train workers."""
    from ray import tune

    r = spec.resources
    if r["workers_per_trial"] == 0:
        return {"cpu": r["cpus_per_trial"], "gpu": r["gpus_per_trial"]}
    # The trial (driver of its TorchTrainer) holds only its own share; workers get theirs.
    return tune.PlacementGroupFactory([{"CPU": r["cpus_per_trial"]}])


def searcher(spec: SweepSpec, storage):
    """Ray's ``OptunaSearch`` over the study named after the sweep in ``storage`` (an Optuna
    ``BaseStorage``): the study is created, or continued when it already exists."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    metrics = [o["metric"] for o in spec.objectives]
    modes = [o["mode"] for o in spec.objectives]
    seed = spec.search["seed"]
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
               "random": lambda: optuna.samplers.RandomSampler(seed=seed),
               "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed)}[spec.search["sampler"]]()
    return OptunaSearch(metric=metrics if spec.multi_objective else metrics[0],
                        mode=modes if spec.multi_objective else modes[0], sampler=sampler,
                        points_to_evaluate=spec.search["points_to_evaluate"] or None,
                        study_name=spec.name, storage=storage)


def new_tuner(spec: SweepSpec, trainable, ctx: dict[str, Any], storage_path: str, *, study_storage,
              callbacks: list[Any], fs=None):
    """A fresh ``Tuner`` for the sweep (Ray experiment ``spec.name`` under ``storage_path``)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    metrics = [o["metric"] for o in spec.objectives]
    modes = [o["mode"] for o in spec.objectives]
    scheduler = None
    if spec.scheduler["type"] == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", metric=metrics[0], mode=modes[0],
                                  max_t=spec.scheduler.get("max_t") or int(spec.base.get("epochs", 10)),
                                  grace_period=spec.scheduler["grace_period"],
                                  reduction_factor=spec.scheduler["reduction_factor"])
    return tune.Tuner(
        trainable,
        param_space=param_space(spec, ctx),
        tune_config=tune.TuneConfig(search_alg=searcher(spec, study_storage), scheduler=scheduler,
                                    num_samples=spec.num_trials,
                                    max_concurrent_trials=spec.resources["max_concurrent_trials"]),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage_path, storage_filesystem=fs, verbose=0,
                                  callbacks=callbacks,
                                  # A failed trial (lost node, killed process) restarts from its
                                  # last checkpoint; the run config's checkpoint.keep bounds storage.
                                  failure_config=tune.FailureConfig(max_failures=spec.resources["max_failures"],
                                                                    fail_fast=False),
                                  checkpoint_config=tune.CheckpointConfig(
                                      num_to_keep=RunConfig.from_dict(spec.base).checkpoint.keep)),
    )


def restored_tuner(spec: SweepSpec, trainable, ctx: dict[str, Any], exp_path: str, *, fs=None):
    """The interrupted sweep's ``Tuner``: unfinished trials continue; the searcher (and with it
    the Optuna study in its storage) and the run config's callbacks come back from the
    experiment's checkpoint."""
    from ray import tune

    return tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                              restart_errored=False, param_space=param_space(spec, ctx), storage_filesystem=fs)


def retries_used(grid) -> dict[str, int]:
    """Restarts per trial id, as Tune counted them (kept in the experiment state across
    ``--resume``), read back through the public ``ExperimentAnalysis``. ``Trial.num_failures``
    is a Ray DeveloperAPI; test_cluster_multinode's node-loss test pins it (retries 0 and 1)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
    return {t.trial_id: int(t.num_failures) for t in analysis.trials}
