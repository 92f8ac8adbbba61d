"""The sweep spec: a YAML file in ``tune/``, read and fully validated before Ray starts.

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
    search: {sampler: tpe, seed: 0, points_to_evaluate: [{optimizer.rho: 0.05, ...}],
             storage: postgresql://user@host:5432/optuna}   # the Optuna study's RDB (default below)
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or {type: none}
    num_trials: 8
    resources: {cpus_per_trial: 1, workers_per_trial: 0, cpus_per_worker: 1,
                gpus_per_worker: 0, max_concurrent_trials: 2, max_failures: 0}
    ray: {num_cpus: 2}               # a local Ray's logical CPUs
    tracking: {experiment: zosam-sweeps, registered_model: quick}   # the best model's registered name
    storage_path: s3://bucket/zosam/ray   # Ray's results (default $ZOSAM_STORAGE_PATH, else ./ray_results)
    storage_endpoint: http://127.0.0.1:9000   # an S3-protocol store other than AWS (zosam/storage.py)

``workers_per_trial: 0`` runs the training loop inside the Tune trial (no Train worker
group: cheapest on one machine); ``N >= 1`` launches a ``TorchTrainer`` with N workers
per trial and forwards its reports with ``TuneReportCallback``.

``max_failures`` is each trial's retry budget: Tune restarts a failed trial (a lost node, a
killed process) from its last checkpoint up to that many times, and a trial's Train worker
group gets the same budget for worker failures. Both restarts continue the trial's MLflow
run. The leaderboard shows the retries each trial used out of its budget.

``search.storage`` is the Optuna study's database (an SQLAlchemy URL): default
``$ZOSAM_OPTUNA_STORAGE``, else ``sqlite:///<sweep outputs>/optuna.db`` beside the sweep's
outputs. The study is named after the sweep, so ``optuna-dashboard <storage>`` and
``optuna.load_study(study_name=<name>, storage=<storage>)`` open it (``zosam.sweep.study``).
``tracking.registered_model`` names the MLflow registered model the best trial's model is
registered as (alias ``best``); default ``<experiment>.<name>``.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zosam.config import SEED_MAX, RunConfig, apply_overrides, read_yaml_file
from zosam.storage import check_endpoint
from zosam.sweep.study import check_storage_url_format
from zosam.validate import (
    ConfigError,
    check_experiment_name,
    check_tracking_uri_format,
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
SEARCH_KEYS = {"sampler", "seed", "points_to_evaluate", "storage"}
SCHEDULER_KEYS = {"type", "grace_period", "reduction_factor", "max_t"}
OBJECTIVE_METRICS = ("test_acc", "test_loss", "train_loss", "train_acc", "train_time_s", "passes_backward",
                     "passes_forward_no_grad", "images_per_s")


@dataclass
class SweepSpec:
    """A validated sweep spec (``load_spec``); ``raw`` is the spec as written, logged with the sweep."""

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
    search = {"sampler": "tpe", "seed": 0, "points_to_evaluate": [], "storage": None,
              **section("search", raw.get("search"), SEARCH_KEYS)}
    choice("search.sampler", search["sampler"], ("tpe", "random", "nsga2"))
    in_range("search.seed", search["seed"], 0, SEED_MAX, integer=True)
    if not isinstance(search["points_to_evaluate"] or [], list):
        raise ConfigError(f"search.points_to_evaluate={show(search['points_to_evaluate'])} is invalid; "
                          "must be a list of mappings of space fields")
    for i, point in enumerate(search["points_to_evaluate"] or []):
        section(f"search.points_to_evaluate[{i}]", point, set(space))
    if search["storage"] is not None:
        check_storage_url_format("search.storage", search["storage"])
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
    tracking = {"experiment": "zosam-sweeps",
                **section("tracking", raw.get("tracking"), {"experiment", "uri", "registered_model"})}
    check_experiment_name("tracking.experiment", tracking["experiment"])
    if tracking.get("registered_model") is None:  # derived: the experiment's name made path-safe
        tracking["registered_model"] = f"{re.sub(r'[^A-Za-z0-9._+-]+', '-', tracking['experiment'])}.{name}"[-128:]
        tracking["registered_model"] = tracking["registered_model"].lstrip("._+-") or name
    safe_name("tracking.registered_model", tracking["registered_model"])
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
