"""Sweeps: a YAML spec in ``tune/`` -> Ray Tune + Optuna (+ ASHA) -> one MLflow child run per trial.

Spec layout (every key validated before Ray starts; see ``tune/quick.yaml``)::

    name: quick                      # sweep name: Ray experiment and MLflow parent run
    base: configs/x.yaml | {...}     # the base run config (file path or inline mapping)
    overrides: {epochs: 3}           # dotted overrides applied to the base
    space:                           # dotted run-config fields -> distributions
      optimizer.rho: {loguniform: [0.01, 0.5]}
      optimizer.q: {choice: [1, 2, 4]}
      optimizer.mu: {loguniform: [1.0e-4, 1.0e-2]}
      sparse.drop_fraction: {uniform: [0.1, 0.5]}
      sparse.update_interval: {randint: [10, 50]}   # integers, low <= x <= high
    objectives: [{metric: test_acc, mode: max}]     # two or more: multi-objective (Pareto)
    search: {sampler: tpe, seed: 0, points_to_evaluate: [{optimizer.rho: 0.05, ...}]}
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or {type: none}
    num_trials: 8
    resources: {cpus_per_trial: 1, workers_per_trial: 0, cpus_per_worker: 1,
                gpus_per_worker: 0, max_concurrent_trials: 2, max_failures: 0}
    ray: {num_cpus: 2}               # a local Ray's logical CPUs
    tracking: {experiment: zosam-sweeps}
    storage_path: s3://bucket/zosam/ray   # Ray's results (default $ZOSAM_STORAGE_PATH, else ./ray_results)
    storage_endpoint: http://127.0.0.1:9000   # an S3-protocol store other than AWS (zosam/storage.py)

``workers_per_trial: 0`` runs the training loop inside the Tune trial (no Train worker
group: cheapest on one machine); ``N >= 1`` launches a ``TorchTrainer`` with N workers
per trial and forwards its reports with ``TuneReportCallback``.

``max_failures`` is each trial's retry budget: Tune restarts a failed trial (a lost node, a
killed process) from its last checkpoint up to that many times, and a trial's Train worker
group gets the same budget for worker failures. Both restarts continue the trial's MLflow
run. The leaderboard shows the retries each trial used out of its budget.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zosam.config import SEED_MAX, RunConfig, apply_overrides, read_yaml_file
from zosam.pareto import pareto_front
from zosam.storage import check_endpoint
from zosam.validate import (
    ConfigError,
    check_experiment_name,
    check_tracking_uri_format,
    check_writable_dir,
    choice,
    in_range,
    safe_name,
    section,
    show,
)

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
SPEC_KEYS = {"name", "description", "base", "overrides", "space", "objectives", "search", "scheduler",
             "num_trials", "resources", "ray", "tracking", "storage_path", "storage_endpoint"}
RESOURCE_KEYS = {"cpus_per_trial": 1.0, "workers_per_trial": 0, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0,
                 "gpus_per_trial": 0.0, "max_concurrent_trials": 1, "max_failures": 0}
SEARCH_KEYS = {"sampler", "seed", "points_to_evaluate"}
SCHEDULER_KEYS = {"type", "grace_period", "reduction_factor", "max_t"}
OBJECTIVE_METRICS = ("test_acc", "test_loss", "train_loss", "train_acc", "train_time_s", "passes_backward",
                     "passes_forward_no_grad", "images_per_s")


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]
    space: dict[str, dict[str, Any]]
    objectives: list[dict[str, str]]
    search: dict[str, Any]
    scheduler: dict[str, Any]
    num_trials: int
    resources: dict[str, Any]
    ray: dict[str, Any]
    tracking: dict[str, Any]
    storage_path: str | None
    storage_endpoint: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


def _any_keys(d: Any) -> set[Any]:
    """The keys of a free-form mapping section (``space``, ``overrides``): all allowed, if it is one."""
    return set(d) if isinstance(d, dict) else set()


def _check_distribution(key: str, dist: Any) -> None:
    if not isinstance(dist, dict) or len(dist) != 1:
        raise ConfigError(f"space.{key} must be one of {{{' | '.join(DISTRIBUTIONS)}: ...}}")
    (kind, args), = dist.items()
    choice(f"space.{key} distribution", kind, DISTRIBUTIONS)
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"space.{key}.choice must be a non-empty list")
        return
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"space.{key}.{kind} must be [low, high]")
    low, high = args
    in_range(f"space.{key}.{kind} low", low, integer=kind == "randint")
    in_range(f"space.{key}.{kind} high", high, integer=kind == "randint")
    if not low < high and not (kind == "randint" and low == high):
        raise ConfigError(f"space.{key}.{kind}=[{low}, {high}] is an empty or inverted range; need low < high")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"space.{key}.loguniform low={low} is invalid; must be > 0")


def _corners(space: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Values that must all be valid run-config values: each range's ends, each choice."""
    out = []
    for key, dist in space.items():
        for v in next(iter(dist.values())):
            out.append({key: v})
    return out


def load_spec(path_or_dict: str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> SweepSpec:
    """Read and fully validate a sweep spec: nothing is started when this raises."""
    if isinstance(path_or_dict, dict):
        raw, root = copy.deepcopy(path_or_dict), Path.cwd()
    else:
        p = Path(path_or_dict)
        raw, root = read_yaml_file(p, "sweep spec"), p.resolve().parent.parent
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: a sweep spec must be a mapping")
    raw = apply_overrides(raw, list(overrides))
    section("", raw, SPEC_KEYS)
    name = raw.get("name")
    if name is None:
        raise ConfigError("name is required: a non-empty string naming the sweep")
    safe_name("name", name)
    base = raw.get("base", {})
    if isinstance(base, str):
        bp = Path(base) if Path(base).is_absolute() else root / base
        if not bp.is_file():
            raise ConfigError(f"base={show(base)}: no such run config file")
        base = read_yaml_file(bp, "base run config")
    if not isinstance(base, dict):
        raise ConfigError("base must be a run-config mapping or a path to one")
    base = apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in
                                  section("overrides", raw.get("overrides"), _any_keys(raw.get("overrides"))).items()])
    base.setdefault("name", name)
    RunConfig.from_dict(base)  # the base itself must be a valid run
    space = section("space", raw.get("space"), _any_keys(raw.get("space")))
    if not space:
        raise ConfigError("space is empty: give at least one dotted run-config field to search")
    for key, dist in space.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"space key {show(key)} is invalid; must be a dotted run-config field")
        _check_distribution(key, dist)
        try:  # optimizer fields depend on the optimizer class: ask the run config itself
            RunConfig.from_dict(apply_overrides(base, [f"{key}={json.dumps(next(iter(dist.values()))[0])}"]))
        except ValueError as e:
            if str(e).startswith("unknown key") or "must be a mapping" in str(e):
                raise ConfigError(f"space.{key} is not a field of the run config ({e})") from None
    objectives = raw.get("objectives") or [{"metric": "test_acc", "mode": "max"}]
    if not isinstance(objectives, list):
        raise ConfigError(f"objectives={show(objectives)} is invalid; must be a list of {{metric, mode}} mappings")
    for i, o in enumerate(objectives):
        o = section(f"objectives[{i}]", o, {"metric", "mode"})
        choice(f"objectives[{i}].metric", o.get("metric"), OBJECTIVE_METRICS)
        choice(f"objectives[{i}].mode", o.get("mode"), ("max", "min"))
    search = {"sampler": "tpe", "seed": 0, "points_to_evaluate": [],
              **section("search", raw.get("search"), SEARCH_KEYS)}
    choice("search.sampler", search["sampler"], ("tpe", "random", "nsga2"))
    in_range("search.seed", search["seed"], 0, SEED_MAX, integer=True)
    if not isinstance(search["points_to_evaluate"] or [], list):
        raise ConfigError(f"search.points_to_evaluate={show(search['points_to_evaluate'])} is invalid; "
                          "must be a list of mappings of space fields")
    for i, point in enumerate(search["points_to_evaluate"] or []):
        section(f"search.points_to_evaluate[{i}]", point, set(space))
    scheduler = {"type": "asha", "grace_period": 1, "reduction_factor": 2,
                 **section("scheduler", raw.get("scheduler"), SCHEDULER_KEYS)}
    choice("scheduler.type", scheduler["type"], ("asha", "none"))
    in_range("scheduler.grace_period", scheduler["grace_period"], 1, integer=True)
    in_range("scheduler.reduction_factor", scheduler["reduction_factor"], 1, low_open=True)
    if scheduler["type"] == "asha" and len(objectives) > 1:
        raise ConfigError("scheduler.type=asha needs one objective; use scheduler.type=none in "
                         "multi-objective mode (ASHA would stop trials on one objective only)")
    num_trials = in_range("num_trials", raw.get("num_trials", 8), 1, integer=True)
    resources = {**RESOURCE_KEYS, **section("resources", raw.get("resources"), set(RESOURCE_KEYS))}
    for k in ("cpus_per_trial", "cpus_per_worker"):
        in_range(f"resources.{k}", resources[k], 0, low_open=True)
    for k in ("gpus_per_worker", "gpus_per_trial"):
        in_range(f"resources.{k}", resources[k], 0)
    in_range("resources.workers_per_trial", resources["workers_per_trial"], 0, integer=True)
    in_range("resources.max_concurrent_trials", resources["max_concurrent_trials"], 1, integer=True)
    in_range("resources.max_failures", resources["max_failures"], 0, integer=True)
    ray_cfg = section("ray", raw.get("ray"), {"num_cpus", "num_gpus"})
    for k in ("num_cpus", "num_gpus"):
        if ray_cfg.get(k) is not None:
            in_range(f"ray.{k}", ray_cfg[k], 1 if k == "num_cpus" else 0, integer=True)
    tracking = {"experiment": "zosam-sweeps", **section("tracking", raw.get("tracking"), {"experiment", "uri"})}
    check_experiment_name("tracking.experiment", tracking["experiment"])
    if tracking.get("uri") is not None:
        check_tracking_uri_format("tracking.uri", tracking["uri"])
    if raw.get("storage_path") is not None and (not isinstance(raw["storage_path"], str) or not raw["storage_path"]):
        raise ConfigError(f"storage_path={show(raw['storage_path'])} is invalid; must be a folder path or URI")
    # Every end of every range must give a valid run config (e.g. rho > 0, density <= 1).
    for corner in _corners(space) + list(search["points_to_evaluate"] or []):
        try:
            RunConfig.from_dict(apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in corner.items()]))
        except ValueError as e:
            raise ConfigError(f"space: {corner} gives an invalid run config: {e}") from None
    endpoint = raw.get("storage_endpoint")
    if endpoint is not None:
        check_endpoint("storage_endpoint", endpoint)
    return SweepSpec(name, base, space, objectives, search, scheduler, num_trials, resources, ray_cfg, tracking,
                     raw.get("storage_path"), endpoint, raw)


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """Logical resources one trial holds: the trial itself, plus its Train workers if any."""
    r = spec.resources
    workers = r["workers_per_trial"]
    cpu = r["cpus_per_trial"] + workers * r["cpus_per_worker"]
    gpu = r["gpus_per_trial"] + workers * r["gpus_per_worker"]
    return {"CPU": cpu, "GPU": gpu}


def check_cluster_can_run(spec: SweepSpec, cluster: dict[str, float]) -> None:
    """Reject a spec whose single trial needs more than the whole cluster has."""
    need = trial_resources(spec)
    for res, amount in need.items():
        have = cluster.get(res, 0.0)
        if amount > have + 1e-9:
            field_name = "resources.gpus_per_worker" if res == "GPU" else "resources.cpus_per_trial/cpus_per_worker"
            raise ConfigError(f"{field_name}: one trial needs {amount:g} {res} but the Ray cluster has {have:g}; "
                             "lower the request or add nodes")


# -- the trainable ------------------------------------------------------------------------------
def trial_function(config: dict[str, Any]) -> None:
    """One Tune trial: apply the sampled values to the base config and train."""
    import ray.train
    import torch
    from ray import tune

    from zosam.ray_train import make_trainer, run_in_session

    ctx = config["_zosam"]
    if ctx["workers_per_trial"] == 0:  # the trial trains itself: one torch thread per CPU it holds
        torch.set_num_threads(max(1, int(ctx["cpus_per_trial"])))
    params = {k: v for k, v in config.items() if k != "_zosam"}
    run_dict = apply_overrides(ctx["base"], [f"{k}={json.dumps(v)}" for k, v in params.items()])
    trial_id = tune.get_context().get_trial_id()
    run_dict["name"] = f"{ctx['sweep']}-{trial_id}"
    run_dict.setdefault("tracking", {})["experiment"] = ctx["experiment"]  # children beside their parent
    # Where the trial (last) ran: a restarted trial may land on another node.
    tags = {"zosam.sweep": ctx["sweep"], "zosam.trial_id": trial_id,
            "zosam.ray_node_id": ray.get_runtime_context().get_node_id()}
    if ctx["workers_per_trial"] == 0:
        run_in_session(run_dict, report=tune.report, get_checkpoint=tune.get_checkpoint,
                       checkpoint_cls=tune.Checkpoint, rank=0, tracking_uri=ctx["tracking_uri"],
                       parent_run_id=ctx["parent_run_id"], extra_tags=tags,
                       run_key=f"{ctx['parent_run_id']}/{trial_id}")
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from zosam.storage import filesystem, ray_path

    endpoint = ctx.get("storage_endpoint")
    trainer = make_trainer(run_dict, num_workers=ctx["workers_per_trial"], use_gpu=ctx["gpus_per_worker"] > 0,
                           cpus_per_worker=ctx["cpus_per_worker"], name=run_dict["name"],
                           storage_path=ray_path(ctx["train_storage"], endpoint),
                           storage_filesystem=filesystem(ctx["train_storage"], endpoint),
                           max_failures=ctx["max_failures"],
                           tracking_uri=ctx["tracking_uri"], parent_run_id=ctx["parent_run_id"], extra_tags=tags,
                           callbacks=[TuneReportCallback()])
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        from zosam.ray_train import TrialFailed

        raise TrialFailed(str(e)) from None


def _distribution(dist: dict[str, Any]):
    from ray import tune

    (kind, args), = dist.items()
    if kind == "choice":
        return tune.choice(args)
    if kind == "randint":
        return tune.randint(args[0], args[1] + 1)  # Tune's upper bound is exclusive
    return getattr(tune, kind)(*args)


# -- results ------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    completed: bool
    trials: list[dict[str, Any]]
    best: list[dict[str, Any]]
    parent_run_id: str
    best_config_path: Path | None
    storage: Path


def _make_callback(spec: SweepSpec, tracking_uri: str):
    """Driver-side Tune callback: live progress lines and MLflow status of stopped/failed trials."""
    from ray.tune import Callback

    from zosam.tracking import RunLogger

    epochs = int(spec.base.get("epochs", 10))
    primary = spec.objectives[0]["metric"]

    class SweepCallback(Callback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
            value = result.get(primary)
            print(f"[{time.perf_counter() - self.t0:6.0f}s] trial {trial.trial_id} epoch {result.get('epoch')}/"
                  f"{epochs} {primary}={value if value is None else round(value, 4)}  "
                  f"({done}/{spec.num_trials} trials done)", flush=True)

        def _finish(self, trial, status: str, reason: str | None = None) -> None:
            run_id = (trial.last_result or {}).get("mlflow_run_id")
            if run_id:
                RunLogger(tracking_uri, spec.tracking["experiment"], "", run_id=run_id).end(status, reason)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            if last.get("epoch", epochs) < epochs:  # ASHA (or max_t) stopped it
                self._finish(trial, "stopped_early", f"stopped by the scheduler after epoch {last.get('epoch')}")
                print(f"trial {trial.trial_id} stopped early by {spec.scheduler['type']} at epoch "
                      f"{last.get('epoch')}", flush=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            print(f"trial {trial.trial_id} failed ({_trial_error(trial)}); restarting from its last checkpoint, "
                  f"retry {trial.num_failures}/{spec.resources['max_failures']}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            reason = _trial_error(trial)
            run_id = (trial.last_result or {}).get("mlflow_run_id")
            if run_id:  # the run has logged its own failure when it could; make sure it is marked
                self._finish(trial, "failed", reason)
            print(f"trial {trial.trial_id} FAILED: {reason}", flush=True)

    return SweepCallback()


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text() if path and Path(path).is_file() else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "TrialFailed" in ln or "Diverged" in ln or "Error" in ln:
            return ln.strip()[:500]
    return lines[-1][:500] if lines else "trial failed"


def _sweep_state(storage: Path, spec: SweepSpec, tracking_uri: str, resume: bool) -> dict[str, Any]:
    """The parent MLflow run of this sweep, created once and found again on ``--resume``."""
    from zosam.tracking import RunLogger

    state_file = storage / f"{spec.name}.zosam.json"
    if resume and state_file.is_file():
        return json.loads(state_file.read_text())
    parent = RunLogger(tracking_uri, spec.tracking["experiment"], spec.name,
                       tags={"zosam.sweep": spec.name, "zosam.role": "sweep"})
    parent.log_dict(spec.raw, "sweep_spec.yaml")
    parent.log_params({f"sweep.{k}": v for k, v in {"num_trials": spec.num_trials,
                                                      "scheduler": spec.scheduler["type"],
                                                      "sampler": spec.search["sampler"],
                                                      "seed": spec.search["seed"]}.items()})
    state = {"parent_run_id": parent.run_id, "tracking_uri": tracking_uri}
    storage.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state))
    return state


def run_sweep(spec_path: str | Path | dict[str, Any], *, address: str | None = None, resume: bool = False,
              tracking_uri: str | None = None, storage_path: str | None = None, num_cpus: int | None = None,
              storage_endpoint: str | None = None, overrides: Sequence[str] = (), out: Any = print) -> SweepResult:
    """Run (or resume) a sweep; print a leaderboard; write the best config as YAML.

    ``storage_endpoint`` (or the spec's, or ``$AWS_ENDPOINT_URL_S3``) points an ``s3://``
    ``storage_path`` at an S3-protocol server other than AWS (``zosam.storage``).
    """
    if num_cpus is not None:
        in_range("--num-cpus", num_cpus, 1, integer=True)
    spec = load_spec(spec_path, overrides)  # all validation before Ray starts
    from zosam.storage import filesystem, ray_path, resolve_endpoint
    from zosam.tracking import check_tracking_uri, default_tracking_uri, ensure_experiment

    uri = check_tracking_uri("--tracking-uri", tracking_uri or spec.tracking.get("uri") or default_tracking_uri())
    storage_uri = storage_path or spec.storage_path or os.environ.get("ZOSAM_STORAGE_PATH") or "ray_results"
    endpoint = resolve_endpoint(storage_uri, storage_endpoint if storage_endpoint is not None
                                else spec.storage_endpoint,
                                "--storage-endpoint" if storage_endpoint is not None else "storage_endpoint")
    remote = "://" in storage_uri  # s3://, gs://: Ray's storage; sweep bookkeeping stays local
    if not remote:
        storage_uri = str(Path(storage_uri).resolve())
        check_writable_dir("--storage-path", storage_uri)
    fs = filesystem(storage_uri, endpoint)
    local = Path("sweep_outputs").resolve() if remote else Path(storage_uri)
    import ray
    from ray import tune

    from zosam.ray_train import connect_or_start, stop_local_ray
    from zosam.storage import check_multi_node_settings

    started = connect_or_start(address, num_cpus=num_cpus if num_cpus is not None else spec.ray.get("num_cpus"))
    try:
        check_multi_node_settings(uri, storage_uri, len([n for n in ray.nodes() if n.get("Alive")]))
        check_cluster_can_run(spec, ray.cluster_resources())
        ensure_experiment(uri, spec.tracking["experiment"])  # once, before trials race to create it
        state = _sweep_state(local, spec, uri, resume)
        ctx = {"base": spec.base, "sweep": spec.name, "tracking_uri": uri, "parent_run_id": state["parent_run_id"],
               "experiment": spec.tracking["experiment"],
               "train_storage": f"{storage_uri}/{spec.name}-train", "storage_endpoint": endpoint,
               **spec.resources}
        trainable = tune.with_resources(trial_function, _placement(spec))
        exp_dir = f"{storage_uri}/{spec.name}"
        if resume and tune.Tuner.can_restore(ray_path(exp_dir, endpoint), storage_filesystem=fs):
            out(f"resuming sweep {spec.name!r} from {exp_dir}")
            tuner = tune.Tuner.restore(ray_path(exp_dir, endpoint), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False,
                                       param_space={**_space(spec), "_zosam": ctx}, storage_filesystem=fs)
        else:
            if not remote and Path(exp_dir).exists() and not resume:
                raise ConfigError(f"a sweep named {spec.name!r} already exists in {storage_uri}; use --resume to "
                                 "continue it, or --set name=<new name>")
            tuner = _new_tuner(spec, trainable, ctx, ray_path(storage_uri, endpoint), uri, fs)
        grid = tuner.fit()
        return _report(spec, grid, state["parent_run_id"], uri, local, out, ray_dir=exp_dir,
                       retries=_retries_used(grid))
    finally:
        if started:
            stop_local_ray()


def _space(spec: SweepSpec) -> dict[str, Any]:
    return {k: _distribution(d) for k, d in spec.space.items()}


def _placement(spec: SweepSpec):
    from ray import tune

    r = spec.resources
    if r["workers_per_trial"] == 0:
        return {"cpu": r["cpus_per_trial"], "gpu": r["gpus_per_trial"]}
    # The trial (driver of its TorchTrainer) holds only its own share; workers get theirs.
    return tune.PlacementGroupFactory([{"CPU": r["cpus_per_trial"]}])


def _new_tuner(spec: SweepSpec, trainable, ctx: dict[str, Any], storage: str, uri: str, fs=None):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from zosam.ray_train import epoch_metrics  # noqa: F401  (documents what trials report)

    metrics = [o["metric"] for o in spec.objectives]
    modes = [o["mode"] for o in spec.objectives]
    seed = spec.search["seed"]
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
               "random": lambda: optuna.samplers.RandomSampler(seed=seed),
               "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed)}[spec.search["sampler"]]()
    searcher = OptunaSearch(metric=metrics if spec.multi_objective else metrics[0],
                            mode=modes if spec.multi_objective else modes[0], sampler=sampler,
                            points_to_evaluate=spec.search["points_to_evaluate"] or None)
    scheduler = None
    if spec.scheduler["type"] == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", metric=metrics[0], mode=modes[0],
                                  max_t=spec.scheduler.get("max_t") or int(spec.base.get("epochs", 10)),
                                  grace_period=spec.scheduler["grace_period"],
                                  reduction_factor=spec.scheduler["reduction_factor"])
    return tune.Tuner(
        trainable,
        param_space={**_space(spec), "_zosam": ctx},
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=spec.num_trials,
                                    max_concurrent_trials=spec.resources["max_concurrent_trials"]),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage, storage_filesystem=fs, verbose=0,
                                  callbacks=[_make_callback(spec, uri)],
                                  # A failed trial (lost node, killed process) restarts from its
                                  # last checkpoint; the run config's checkpoint.keep bounds storage.
                                  failure_config=tune.FailureConfig(max_failures=spec.resources["max_failures"],
                                                                    fail_fast=False),
                                  checkpoint_config=tune.CheckpointConfig(
                                      num_to_keep=RunConfig.from_dict(spec.base).checkpoint.keep)),
    )


def _retries_used(grid) -> dict[str, int]:
    """Restarts per trial id, as Tune counted them (kept in the experiment state across ``--resume``)."""
    analysis = getattr(grid, "_experiment_analysis", None)
    return {t.trial_id: int(t.num_failures) for t in getattr(analysis, "trials", None) or []}


def _report(spec: SweepSpec, grid, parent_run_id: str, uri: str, storage: Path, out, *, ray_dir: str,
            retries: dict[str, int] | None = None) -> SweepResult:
    from zosam.tracking import RunLogger

    metrics = [o["metric"] for o in spec.objectives]
    modes = [o["mode"] for o in spec.objectives]
    trials = []
    for r in grid:
        m = r.metrics or {}
        params = {k: v for k, v in (r.config or {}).items() if k != "_zosam"}
        status = "failed" if r.error else ("stopped_early" if m.get("epoch", 0) < int(spec.base.get("epochs", 10))
                                           else "finished")
        trial_id = m.get("trial_id") or Path(r.path).name
        trials.append({"trial_id": trial_id, "status": status, "params": params,
                       "retries": (retries or {}).get(trial_id, 0), "max_failures": spec.resources["max_failures"],
                       **{k: m.get(k) for k in (*metrics, "epoch", "train_time_s", "passes_backward",
                                                "mlflow_run_id", "time_total_s")}})
    ok = [t for t in trials if t["status"] != "failed" and all(t.get(k) is not None for k in metrics)]
    if spec.multi_objective:
        full = [t for t in ok if t["status"] == "finished"] or ok
        best = [full[i] for i in pareto_front([[t[k] for k in metrics] for t in full], modes)]
    else:
        best = sorted(ok, key=lambda t: t[metrics[0]], reverse=modes[0] == "max")[:1]
    order = sorted(trials, key=lambda t: (t["status"] == "failed", -(t.get(metrics[0]) or -math.inf)
                                          if modes[0] == "max" else (t.get(metrics[0]) or math.inf)))
    out(f"\nsweep {spec.name!r}: {len(trials)} trials "
        f"({sum(t['status'] == 'finished' for t in trials)} finished, "
        f"{sum(t['status'] == 'stopped_early' for t in trials)} stopped early, "
        f"{sum(t['status'] == 'failed' for t in trials)} failed)")
    out(_leaderboard(order, metrics, list(spec.space), best))
    parent = RunLogger(uri, spec.tracking["experiment"], spec.name, run_id=parent_run_id)
    best_path = None
    if best:
        best_cfg = apply_overrides(spec.base, [f"{k}={json.dumps(v)}" for k, v in best[0]["params"].items()])
        best_cfg["name"] = f"{spec.name}-best"
        best_path = storage / f"{spec.name}-best.yaml"
        best_path.write_text(yaml.safe_dump(best_cfg, sort_keys=False))
        parent.log_dict(best_cfg, "best_config.yaml")
        parent.log_dict({"front" if spec.multi_objective else "best": best}, "best_trials.yaml")
        out(f"best config: {best_path}  (run it: zosam train --config {best_path})")
    _log_sweep_plots(parent, trials, metrics, modes, list(spec.space), best)
    parent.log_dict({"trials": trials}, "trials.yaml")
    parent.end("finished")
    out(f"results: Ray {ray_dir}; MLflow {uri} (experiment {spec.tracking['experiment']!r}, "
        f"parent run {parent_run_id})")
    if uri.startswith("sqlite:"):
        out(f"look at it: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000  "
            "(then open http://127.0.0.1:5000)")
    completed = all(t["status"] != "failed" for t in trials) or bool(best)
    return SweepResult(completed, trials, best, parent_run_id, best_path, storage)


def _leaderboard(trials: list[dict[str, Any]], metrics: list[str], keys: list[str], best) -> str:
    from zosam.bench import format_table

    best_ids = {t["trial_id"] for t in best}
    rows = []
    for t in trials:
        row = {"": "*" if t["trial_id"] in best_ids else "", "trial": t["trial_id"], "status": t["status"],
               "epochs": t.get("epoch"), "retries": f"{t.get('retries', 0)}/{t.get('max_failures', 0)}"}
        row.update({k: t.get(k) for k in metrics})
        row.update({k.split(".")[-1]: t["params"].get(k) for k in keys})
        rows.append(row)
    return format_table(rows)


def _log_sweep_plots(parent, trials, metrics, modes, keys, best) -> None:
    """Optimisation history, parameter importances (|Spearman rho| with the objective) and,
    in multi-objective mode, the Pareto front, as matplotlib figures on the parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if t.get(metrics[0]) is not None]
    if not done:
        return
    m0, better = metrics[0], (max if modes[0] == "max" else min)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    values = [t[m0] for t in done]
    ax.plot(range(1, len(values) + 1), values, "o", label="trial")
    ax.plot(range(1, len(values) + 1), [better(values[: i + 1]) for i in range(len(values))], "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(m0)
    ax.legend()
    ax.set_title("optimisation history")
    parent.log_figure(fig, "plots/optimization_history.png")
    plt.close(fig)
    imp = {}
    for k in keys:
        xs = [t["params"].get(k) for t in done]
        if all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs) and len(set(xs)) > 1:
            imp[k] = abs(_spearman(xs, values))
    if imp:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.barh(list(imp), list(imp.values()))
        ax.set_xlabel(f"|Spearman correlation| with {m0}")
        ax.set_title("parameter importance")
        parent.log_figure(fig, "plots/param_importances.png")
        plt.close(fig)
    if len(metrics) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        pts = [t for t in done if t.get(metrics[1]) is not None]
        ax.plot([t[metrics[1]] for t in pts], [t[m0] for t in pts], "o", alpha=0.5, label="trials")
        front = sorted(best, key=lambda t: t[metrics[1]])
        ax.plot([t[metrics[1]] for t in front], [t[m0] for t in front], "r-o", label="Pareto front")
        ax.set_xlabel(metrics[1])
        ax.set_ylabel(m0)
        ax.legend()
        parent.log_figure(fig, "plots/pareto_front.png")
        plt.close(fig)


def _spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else 0.0
