"""The platform on a real local Ray (loopback, with its dashboard): Train, Tune + Optuna, MLflow.

Tiny real data (``digits``), tiny models, few steps. One module-scoped local Ray
(``start_local_ray(num_cpus=4)``) serves every test but the driver-kill test, which starts
its own Ray in a ``zosam sweep`` subprocess (a killed driver must take its Ray with it) and
runs first, before the shared Ray exists. Everything is stopped by the process ids this
file started; never ``ray stop`` (it would kill every Ray on the machine).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from proc_utils import descendants, kill_tree

from zosam.config import RunConfig, load_config
from zosam.engine import CHECKPOINT_FILE
from zosam.pareto import pareto_front

pytestmark = pytest.mark.ray

EXPERIMENT = "zosam-ray-tests"


def run_dict(name: str, **changes: Any) -> dict[str, Any]:
    """A tiny ZO-SAM + RigL run on 8x8 digits (an MLP: no BatchNorm)."""
    d: dict[str, Any] = {
        "name": name, "seed": 0, "epochs": 2, "max_steps_per_epoch": 8,
        "data": {"name": "digits", "image_size": 8, "batch_size": 32, "eval_batch_size": 512},
        "model": {"name": "mlp", "in_features": 192, "hidden": [32, 32]},
        "optimizer": {"name": "zosam", "base": "sgd", "lr": 0.3, "momentum": 0.9, "rho": 0.05, "mu": 1e-3, "q": 2},
        "sparse": {"method": "rigl", "density": 0.5, "update_interval": 3, "drop_fraction": 0.3},
        "tracking": {"enabled": False, "experiment": EXPERIMENT},
    }
    for k, v in changes.items():
        section, _, leaf = k.partition("__")
        if leaf:
            d[section] = {**d[section], leaf: v}
        else:
            d[section] = v
    return d


def final_weights(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


def single_process(cfg: dict[str, Any], out: Path):
    """The plain ``zosam train`` path (``zosam.runner.run``) in this process."""
    from zosam.runner import run

    outcome = run(RunConfig.from_dict(cfg), checkpoint_dir=out, log=None)
    assert outcome.status == "finished", outcome.reason
    return outcome


def children(uri: str, parent_run_id: str):
    """The sweep's child runs, as ``mlflow.search_runs`` returns them (a DataFrame)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[EXPERIMENT],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


def sweep_spec(name: str, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "base": run_dict(name, tracking={"enabled": True, "experiment": EXPERIMENT}),
        "space": {"optimizer.rho": {"loguniform": [0.01, 0.2]}, "optimizer.mu": {"loguniform": [1e-4, 1e-2]},
                  "optimizer.q": {"choice": [1, 2]}},
        "objectives": [{"metric": "test_acc", "mode": "max"}],
        "search": {"sampler": "tpe", "seed": 0},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "num_trials": 4,
        "resources": {"cpus_per_trial": 1, "workers_per_trial": 0, "max_concurrent_trials": 2},
        "tracking": {"experiment": EXPERIMENT},
    }
    spec.update(changes)
    return spec


# -- processes this file starts (the driver-kill test) --------------------------------------------
def _sweep_cli(spec: Path, tmp: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "zosam.cli", "sweep", str(spec), "--storage-path", str(tmp / "ray"),
           "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--num-cpus", "2", *extra]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("ZOSAM_PID_DIR", None)
    return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_resume_after_the_driver_is_killed(tmp_path: Path) -> None:
    """SIGKILL the whole ``zosam sweep`` process group once a trial has reported, then
    ``--resume``: every trial ends, one MLflow child per trial (no duplicates), one parent."""
    spec = sweep_spec("resume", num_trials=4, scheduler={"type": "none"},
                      resources={"cpus_per_trial": 1, "workers_per_trial": 0, "max_concurrent_trials": 1})
    spec["base"]["epochs"] = 3
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    proc = _sweep_cli(path, tmp_path)
    lines: list[str] = []
    seen: set[int] = set()
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        exp_dir = tmp_path / "ray" / "resume"
        # Kill once a trial has reported an epoch and Tune has saved its experiment state.
        while time.monotonic() < deadline and proc.poll() is None:
            seen |= set(descendants(proc.pid))
            if any("epoch 2/3" in ln for ln in lines) and list(exp_dir.glob("experiment_state*.json")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before it could be killed:\n" + "".join(lines[-40:])
        assert time.monotonic() < deadline, "no trial reported in time:\n" + "".join(lines[-40:])
    finally:
        kill_tree(proc, seen)
    done_before = sum("trials done" in ln for ln in lines)
    assert done_before >= 1
    import optuna

    storage = f"sqlite:///{tmp_path / 'ray' / 'optuna.db'}"  # the study persisted beside the sweep's outputs
    before = optuna.load_study(study_name="resume", storage=storage)
    n_before = len(before.trials)
    assert 1 <= n_before < 4

    proc = _sweep_cli(path, tmp_path, "--resume")
    try:
        out, _ = proc.communicate(timeout=420)
    finally:
        kill_tree(proc, set())
    assert proc.returncode == 0, out[-4000:]
    assert "resuming sweep 'resume'" in out
    import mlflow

    mlflow.set_tracking_uri(uri)
    parents = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string="tags.`zosam.role` = 'sweep'")
    assert len(parents) == 1
    kids = children(uri, parents["run_id"][0])
    assert len(kids) == 4, kids[["tags.zosam.trial_id", "status"]]
    assert kids["tags.zosam.trial_id"].nunique() == 4
    assert set(kids["tags.zosam.status"]) == {"finished"}
    assert set(kids["status"]) == {"FINISHED"}
    assert (kids["metrics.epoch_time_s"] > 0).all()
    trials = yaml.safe_load(mlflow.artifacts.load_text(parents["artifact_uri"][0] + "/trials.yaml"))["trials"]
    assert len(trials) == 4 and {t["status"] for t in trials} == {"finished"}
    after = optuna.load_study(study_name="resume", storage=storage)  # the same study, continued
    assert optuna.get_all_study_names(storage) == ["resume"]
    assert after.trials[0].datetime_start == before.trials[0].datetime_start
    assert [t.number for t in after.trials] == list(range(len(after.trials)))
    complete = after.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(after.trials) > n_before and len(complete) == 4
    assert sorted(t.value for t in complete) == pytest.approx(sorted(t["test_acc"] for t in trials))


# -- the shared local Ray -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One local Ray (4 logical CPUs on loopback, dashboard on) for the module; its workers
    write their pid to ``$ZOSAM_PID_DIR/rank<r>.pid`` (the environment is inherited)."""

    from zosam.ray_train import start_local_ray, stop_local_ray

    pid_dir = tmp_path_factory.mktemp("pids")
    os.environ["ZOSAM_PID_DIR"] = str(pid_dir)
    start_local_ray(num_cpus=4)
    try:
        yield pid_dir
    finally:
        stop_local_ray()
        os.environ.pop("ZOSAM_PID_DIR", None)


def test_two_ray_train_workers_equal_one_process(ray_local: Path, tmp_path: Path) -> None:
    """DDP over gloo with per-worker batch B equals one process with batch 2B (no BatchNorm;
    ZO-SAM on random static masks): the loader's shards of a step make up the single batch.

    Both runs are float64: the two differ only in reduction order (a two-rank gradient
    average, torch's thread count), which float64 rounds at about 1e-16 relative and 16
    steps amplify to about 1e-13, so 1e-9 is far above rounding and far below any real
    difference. In float32 the same runs differ by up to 1.6e-5, and how much depends on
    the CPU's kernels (Intel and AMD machines of one kind disagree).

    A data-driven host (RigL) is not used here: its drop/grow decisions are discontinuous,
    so the last-bit differences of a two-rank gradient average can flip a near-tie and
    move a few weights; that the ranks' masks agree with each other is tested in
    tests/test_sparse_distributed.py."""
    from zosam.ray_train import make_trainer

    cfg = run_dict("ddp", dtype="float64", data__batch_size=16, sparse__method="random")
    result = make_trainer(cfg, num_workers=2, use_gpu=False, name="ddp", storage_path=str(tmp_path / "ray")).fit()
    assert result.error is None
    with result.checkpoint.as_directory() as d:
        ddp = final_weights(d)
    single = single_process(run_dict("single", dtype="float64", data__batch_size=32, sparse__method="random"),
                            tmp_path / "single")
    assert ddp["1.weight"].dtype == torch.float64
    assert_same_weights(ddp, final_weights(tmp_path / "single"), rtol=1e-9, atol=1e-9)
    assert result.metrics["epoch"] == 2
    assert result.metrics["steps"] == single.summary["steps"] == 16
    assert result.metrics["passes_backward"] == single.summary["passes_backward"]
    assert math.isclose(result.metrics["train_loss"], single_process_history_loss(tmp_path),
                        rel_tol=1e-9)
    assert not torch.equal(ddp["1.weight"], torch.zeros_like(ddp["1.weight"]))


def single_process_history_loss(tmp_path: Path) -> float:
    ckpt = torch.load(tmp_path / "single" / CHECKPOINT_FILE, weights_only=True)
    return ckpt["history"][-1]["train_loss"]


def test_a_killed_worker_restores_and_finishes_like_an_uninterrupted_run(ray_local: Path, tmp_path: Path) -> None:
    """SIGKILL the Train worker after its first checkpoint; ``FailureConfig(max_failures=2)``
    restarts it from that checkpoint and the run ends with the uninterrupted run's weights
    and metrics, in the same MLflow run."""
    from zosam.ray_train import make_trainer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    epochs = 8
    cfg = run_dict("ft", epochs=epochs, dtype="float64", tracking={"enabled": True, "experiment": EXPERIMENT})
    pid_file = ray_local / "rank0.pid"
    pid_file.unlink(missing_ok=True)
    storage = tmp_path / "ray"
    trainer = make_trainer(cfg, num_workers=1, use_gpu=False, name="ft", storage_path=str(storage),
                           max_failures=2, tracking_uri=uri)
    box: dict[str, Any] = {}
    fit = threading.Thread(target=lambda: box.setdefault("result", trainer.fit()), daemon=True)
    fit.start()
    deadline = time.monotonic() + 180
    # Two checkpoints on disk: the first is registered (reports are synchronous), so the
    # restart must begin from it rather than from scratch.
    while time.monotonic() < deadline and not (pid_file.is_file()
                                               and len(list((storage / "ft").glob("checkpoint_*"))) >= 2):
        time.sleep(0.05)
    assert fit.is_alive(), "the run ended before the worker could be killed"
    killed = int(pid_file.read_text())
    os.kill(killed, signal.SIGKILL)
    fit.join(timeout=300)
    assert not fit.is_alive(), "the restored run did not finish"
    result = box["result"]
    assert result.error is None
    assert int(pid_file.read_text()) != killed  # a new worker process finished the run

    baseline = single_process(run_dict("ft-base", epochs=epochs, dtype="float64"), tmp_path / "base")
    with result.checkpoint.as_directory() as d:
        restored = torch.load(Path(d) / CHECKPOINT_FILE, weights_only=True)
    base = torch.load(tmp_path / "base" / CHECKPOINT_FILE, weights_only=True)
    # Not bit-equal: the Ray worker runs torch with another thread count (reduction order);
    # float64 makes that rounding (about 1e-13 after 64 steps) far below the tolerance.
    assert_same_weights(restored["model"], base["model"], rtol=1e-9, atol=1e-9)
    assert result.metrics["epoch"] == epochs
    assert result.metrics["test_acc"] == pytest.approx(baseline.summary["final_test_acc"], abs=1e-9)
    assert [h["train_loss"] for h in restored["history"]] == pytest.approx([h["train_loss"] for h in base["history"]],
                                                                           rel=1e-9)
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT])
    assert len(runs) == 1 and runs["status"][0] == "FINISHED"  # the restart continued the same run
    steps = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(runs["run_id"][0], "train_loss")]
    assert sorted(set(steps)) == list(range(1, epochs + 1))


def _overheads(trials: list[dict[str, Any]]) -> list[float]:
    return [t["time_total_s"] - t["train_time_s"] for t in trials
            if t.get("time_total_s") is not None and t.get("train_time_s") is not None]


def test_optuna_asha_sweep_logs_one_child_per_trial(ray_local: Path, tmp_path: Path) -> None:
    """OptunaSearch + ASHA, trials train in-process: one MLflow child per trial under one
    parent, with rho/mu/q params and correct statuses; a diverging trial fails (Tune and
    MLflow, non-finite reason) and the sweep completes; the best config is a runnable YAML."""
    from zosam.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = sweep_spec("asha", num_trials=5)
    spec["space"]["optimizer.lr"] = {"choice": [0.3, 1.0e12]}
    spec["base"]["tracking"]["system_metrics"] = 0.5  # trials last seconds: sample twice a second
    spec["space"]["sparse.method"] = {"choice": ["rigl", "set"]}  # a string choice: Optuna's importance keeps it
    good = {"optimizer.rho": 0.05, "optimizer.mu": 1e-3, "optimizer.q": 1, "optimizer.lr": 0.3,
            "sparse.method": "rigl"}
    spec["search"]["points_to_evaluate"] = [good, {**good, "optimizer.lr": 1.0e12}]
    lines: list[str] = []
    t0 = time.perf_counter()
    result = run_sweep(spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"), out=lines.append)
    wall = time.perf_counter() - t0

    assert len(result.trials) == 5
    diverging = [t for t in result.trials if t["params"]["optimizer.lr"] == 1.0e12]
    assert diverging and all(t["status"] == "failed" for t in diverging)
    assert any(t["status"] != "failed" for t in result.trials)
    assert result.completed and result.best and result.best[0]["status"] != "failed"
    assert {"stopped_early", "finished"} >= {t["status"] for t in result.trials if t["params"]["optimizer.lr"] < 1}

    kids = children(uri, result.parent_run_id)
    assert len(kids) == 5 and kids["tags.zosam.trial_id"].nunique() == 5
    assert (kids["tags.zosam.sweep"] == "asha").all()
    for p in ("optimizer.rho", "optimizer.mu", "optimizer.q"):
        assert kids[f"params.{p}"].notna().all()
    failed = kids[kids["params.optimizer.lr"] == str(1.0e12)]
    assert len(failed) == len(diverging)
    assert (failed["tags.zosam.status"] == "failed").all() and (failed["status"] == "FAILED").all()
    assert failed["tags.zosam.failure_reason"].str.contains("non-finite").all()
    by_id = kids.set_index("tags.zosam.trial_id")
    mlflow_status = {"finished": "FINISHED", "stopped_early": "KILLED"}
    for t in result.trials:
        if t["status"] == "failed":
            continue
        row = by_id.loc[t["trial_id"]]
        assert row["tags.zosam.status"] == t["status"] and row["status"] == mlflow_status[t["status"]]
        assert float(row["params.optimizer.rho"]) == pytest.approx(t["params"]["optimizer.rho"])
        assert row["metrics.test_acc"] == pytest.approx(t["test_acc"])

    best_cfg = load_config(result.best_config_path)
    assert best_cfg.optimizer.hyper["rho"] == pytest.approx(result.best[0]["params"]["optimizer.rho"])
    assert best_cfg.optimizer.hyper["q"] == result.best[0]["params"]["optimizer.q"]
    assert any("best config:" in ln for ln in lines)

    _check_study_and_models(result, uri, spec)

    overhead = _overheads(result.trials)
    print(f"\nOptuna+ASHA sweep: {len(result.trials)} trials in {wall:.1f} s; per-trial Ray overhead "
          f"(time_total_s - train_time_s): {', '.join(f'{o:.1f}' for o in overhead)} s; statuses "
          f"{[t['status'] for t in result.trials]}")
    assert overhead and all(o > 0 for o in overhead)


def _check_study_and_models(result, uri: str, spec: dict[str, Any]) -> None:
    """The Optuna study reopens from its storage with every trial; Optuna's importance covers
    every searched parameter (the string choice too); the parent run has the best objective;
    the registered model's alias ``best`` is the best trial's LoggedModel, and it loads and
    evaluates to the trial's final test accuracy; datasets and system metrics are on each run."""
    import mlflow
    import mlflow.pytorch
    import optuna
    from mlflow import MlflowClient

    from zosam.engine import Trainer

    study = optuna.load_study(study_name=spec["name"], storage=result.study_storage)
    states = [t.state for t in study.trials]
    assert len(states) == len(result.trials)
    assert states.count(optuna.trial.TrialState.FAIL) == sum(t["status"] == "failed" for t in result.trials)
    assert set(result.importances) == set(spec["space"])
    assert all(math.isfinite(v) and v >= 0 for v in result.importances.values())
    assert sum(result.importances.values()) == pytest.approx(1.0)

    c = MlflowClient(uri)
    parent = c.get_run(result.parent_run_id)
    best = result.best[0]
    assert parent.data.metrics["best_trial.test_acc"] == pytest.approx(best["test_acc"])
    assert parent.data.metrics["importance.sparse.method"] == pytest.approx(result.importances["sparse.method"])
    plots = {a.path for a in c.list_artifacts(result.parent_run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/param_importances.png",
            "plots/parallel_coordinate.png"} <= plots

    name = result.registered_model["name"]
    assert name == f"{EXPERIMENT}.{spec['name']}"
    version = c.get_model_version_by_alias(name, "best")
    model_id = c.get_run(best["mlflow_run_id"]).data.tags["zosam.model_id"]
    assert version.run_id == best["mlflow_run_id"] and version.source == f"models:/{model_id}"
    logged = c.get_logged_model(model_id)
    assert logged.source_run_id == best["mlflow_run_id"]
    if best["status"] == "finished":  # final metrics are linked to the model
        assert {m.key: m.value for m in logged.metrics}["final_test_acc"] == pytest.approx(best["test_acc"])

    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"models:/{name}@best")
    cfg = RunConfig.from_dict({**load_config(result.best_config_path).to_dict(), "tracking": {"enabled": False}})
    trainer = Trainer(cfg, log=None)  # the same test split, loaders and evaluation as the trial's
    trainer.model = trainer.net = model
    assert trainer.evaluate()[1] == pytest.approx(best["test_acc"], abs=1e-6)

    run = c.get_run(best["mlflow_run_id"])
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "test"} and inputs["train"].name == "digits"
    assert inputs["train"].digest != inputs["test"].digest
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)


def test_multi_objective_sweep_returns_a_non_dominated_set(ray_local: Path, tmp_path: Path) -> None:
    from zosam.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = sweep_spec("pareto", num_trials=4, scheduler={"type": "none"},
                      objectives=[{"metric": "test_acc", "mode": "max"},
                                  {"metric": "passes_backward", "mode": "min"}])
    spec["base"]["epochs"] = 1
    spec["space"] = {"max_steps_per_epoch": {"choice": [2, 4, 8]}, "optimizer.rho": {"loguniform": [0.01, 0.2]}}
    result = run_sweep(spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"), out=lambda s: None)
    done = [t for t in result.trials if t["status"] == "finished"]
    assert len(done) == 4
    points = [(t["test_acc"], t["passes_backward"]) for t in done]
    front = {done[i]["trial_id"] for i in pareto_front(points, ("max", "min"))}
    assert front and {t["trial_id"] for t in result.best} == front
    for t in done:  # every trial off the front is dominated by one on it
        if t["trial_id"] not in front:
            assert any(b["test_acc"] >= t["test_acc"] and b["passes_backward"] <= t["passes_backward"]
                       for b in result.best)
    assert len(children(uri, result.parent_run_id)) == 4


def test_asha_over_train_workers_runs_every_trial_to_an_end(ray_local: Path, tmp_path: Path) -> None:
    """Trials launch a ``TorchTrainer``; ASHA stops the weak ones early; each trial needs 3 of
    the 4 CPUs, so a stopped trial whose worker group leaked would starve the next one."""
    from zosam.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = sweep_spec("train-asha", num_trials=3,
                      resources={"cpus_per_trial": 1, "workers_per_trial": 1, "cpus_per_worker": 2,
                                 "max_concurrent_trials": 1})
    spec["base"]["epochs"] = 3
    spec["base"]["data"]["batch_size"] = 64
    spec["space"] = {"optimizer.lr": {"choice": [0.3, 1.0e-6]}}
    # The good trial first: ASHA then stops the two that barely learn at epochs 1 or 2.
    spec["search"]["points_to_evaluate"] = [{"optimizer.lr": 0.3}, {"optimizer.lr": 1.0e-6},
                                            {"optimizer.lr": 1.0e-6}]
    box: dict[str, Any] = {}
    run = threading.Thread(target=lambda: box.setdefault("r", run_sweep(
        spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"), out=lambda s: None)), daemon=True)
    t0 = time.perf_counter()
    run.start()
    run.join(timeout=480)
    assert not run.is_alive(), "the sweep did not end in 480 s: a trial is starved of resources"
    result = box["r"]
    statuses = [t["status"] for t in result.trials]
    print(f"\nASHA over Train workers: {statuses} in {time.perf_counter() - t0:.1f} s")
    assert len(result.trials) == 3 and "failed" not in statuses
    assert statuses.count("stopped_early") == 2 and statuses.count("finished") == 1
    kids = children(uri, result.parent_run_id).set_index("tags.zosam.trial_id")
    assert len(kids) == 3
    for t in result.trials:
        assert kids.loc[t["trial_id"], "tags.zosam.status"] == t["status"]


def test_two_local_rays_on_one_host_keep_their_own_address(ray_local: Path, tmp_path: Path) -> None:
    """Each local Ray records its address in a temp dir of its own, which its workers inherit
    (``RAY_TMPDIR``); a second local Ray started and stopped beside it (a second sweep) leaves
    the first one's record, and the machine-wide ``/tmp/ray/ray_current_cluster``, alone."""
    import ray
    from ray._common.utils import get_ray_address_file

    machine_wide = Path("/tmp/ray/ray_current_cluster")
    before = machine_wide.read_text() if machine_wide.is_file() else None
    gcs = ray.get_runtime_context().gcs_address
    own = Path(get_ray_address_file(None))
    assert own.read_text() == gcs and own != machine_wide
    other = subprocess.run(
        [sys.executable, "-c",
         "import os, ray\n"
         "from pathlib import Path\n"
         "from ray._common.utils import get_ray_address_file\n"
         "from zosam.ray_train import start_local_ray, stop_local_ray\n"
         "start_local_ray(num_cpus=1)\n"
         "print(ray.get_runtime_context().gcs_address, Path(get_ray_address_file(None)).read_text())\n"
         "stop_local_ray()\n"],
        capture_output=True, text=True, timeout=180, env={k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"})
    assert other.returncode == 0, other.stderr[-2000:]
    other_gcs, other_recorded = other.stdout.split()[-2:]
    assert other_gcs == other_recorded != gcs
    assert own.read_text() == gcs
    assert (machine_wide.read_text() if machine_wide.is_file() else None) == before

    @ray.remote(num_cpus=0)
    def address_seen_by_a_worker() -> str:
        from ray._private.services import get_ray_address_from_environment

        return get_ray_address_from_environment(None, None)  # how Ray Train's cleanup actor finds its cluster

    assert ray.get(address_seen_by_a_worker.remote(), timeout=120) == gcs
