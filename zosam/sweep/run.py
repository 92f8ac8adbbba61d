"""``run_sweep``: validate, connect to (or start) Ray, run or resume the Tune experiment over
the persisted Optuna study, and report."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zosam.sweep import study as optuna_study
from zosam.sweep.progress import SweepCallback
from zosam.sweep.report import SweepResult, report
from zosam.sweep.spec import SweepSpec, check_cluster_can_run, load_spec
from zosam.sweep.trainable import trial_function
from zosam.sweep.tune import new_tuner, placement, restored_tuner, retries_used
from zosam.validate import ConfigError, check_writable_dir, in_range


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
    ``storage_path`` at an S3-protocol server other than AWS (``zosam.storage``). The Optuna
    study is kept in ``search.storage`` (``zosam.sweep.study``); ``--resume`` continues it.
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
    study_url, study_field = optuna_study.resolve_storage(spec.search["storage"], local)
    if study_field == "--storage-path":
        check_writable_dir("--storage-path", local)
    else:
        optuna_study.check_storage(study_field, study_url)
    exp_dir = f"{storage_uri}/{spec.name}"
    if not resume and not remote and Path(exp_dir).exists():
        raise ConfigError(f"a sweep named {spec.name!r} already exists in {storage_uri}; use --resume to "
                          "continue it, or --set name=<new name>")
    if not resume and optuna_study.study_exists(study_url, spec.name):
        raise ConfigError(f"{study_field} {optuna_study.display_url(study_url)} already holds an Optuna study "
                          f"named {spec.name!r}; use --resume to continue it, or --set name=<new name>")
    import ray
    from ray import tune

    from zosam.ray_train import connect_or_start, stop_local_ray
    from zosam.storage import check_multi_node_settings

    started = connect_or_start(address, num_cpus=num_cpus if num_cpus is not None else spec.ray.get("num_cpus"))
    try:
        check_multi_node_settings(uri, storage_uri, len([n for n in ray.nodes() if n.get("Alive")]))
        check_cluster_can_run(spec, ray.cluster_resources())
        ensure_experiment(uri, spec.tracking["experiment"])  # once, before trials race to create it
        local.mkdir(parents=True, exist_ok=True)
        with optuna_study.open_storage(study_url) as study_storage:
            state = _sweep_state(local, spec, uri, resume)
            ctx = {"base": spec.base, "sweep": spec.name, "tracking_uri": uri, "parent_run_id": state["parent_run_id"],
                   "experiment": spec.tracking["experiment"],
                   "train_storage": f"{storage_uri}/{spec.name}-train", "storage_endpoint": endpoint,
                   **spec.resources}
            trainable = tune.with_resources(trial_function, placement(spec))
            if resume and tune.Tuner.can_restore(ray_path(exp_dir, endpoint), storage_filesystem=fs):
                out(f"resuming sweep {spec.name!r} from {exp_dir}")
                tuner = restored_tuner(spec, trainable, ctx, ray_path(exp_dir, endpoint), fs=fs)
            else:
                tuner = new_tuner(spec, trainable, ctx, ray_path(storage_uri, endpoint), study_storage=study_storage,
                                  callbacks=[SweepCallback(spec, uri)], fs=fs)
            grid = tuner.fit()
            return report(spec, grid, parent_run_id=state["parent_run_id"], uri=uri, outputs=local, out=out,
                          ray_dir=exp_dir, retries=retries_used(grid), study_url=study_url, study_storage=study_storage)
    finally:
        if started:
            stop_local_ray()
