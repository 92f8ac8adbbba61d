"""The training loop of ``zosam train`` as a Ray Train worker loop, and the local Ray it needs.

``run_in_session`` runs :func:`zosam.runner.run` inside any Ray session that has a
``report(metrics, checkpoint=...)`` and a ``get_checkpoint()``: a Ray Train worker
(``ray.train``) or a Tune function trial (``ray.tune``). Rank 0 writes the checkpoint
and reports it; every rank reports metrics (Train V2 synchronises reports across ranks).
On a restore (worker failure with ``FailureConfig(max_failures=...)``, or a resumed
sweep) the run continues from the last reported checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zosam.config import RunConfig
from zosam.engine import CHECKPOINT_FILE, EpochResult

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class TrialFailed(RuntimeError):
    """A run that ended with status ``failed`` (e.g. diverged); Tune marks the trial ERROR."""


def start_local_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start an isolated local Ray bound to loopback, with its dashboard.

    The dashboard (``ray[default]``) must run: Ray Train's cleanup of a worker group whose
    Tune trial was stopped early goes through the state API it serves (stack.md, "the
    early-stopping trap"). That cleanup runs in an actor that finds the cluster without an
    address: ``RAY_ADDRESS``, else the file ``/tmp/ray/ray_current_cluster``, which only
    ``ray start`` writes. A file left by an earlier, stopped ``ray start`` points it at a
    dead cluster and the stopped trial's resources are never freed; so this cluster is
    recorded there too (as ``ray start`` would), and :func:`stop_local_ray` puts back
    what was there.
    """
    import ray

    global _previous_address
    os.environ.setdefault(LOOPBACK_ENV, "0")  # every Ray listener on 127.0.0.1
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=False, configure_logging=False)
    path = _address_file()
    _previous_address = path.read_text() if path.is_file() else None
    path.write_text(ray.get_runtime_context().gcs_address)


def stop_local_ray() -> None:
    """Shut down the Ray that :func:`start_local_ray` started and restore the address file."""
    import ray

    global _previous_address
    ray.shutdown()
    path = _address_file()
    if _previous_address is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(_previous_address)
    _previous_address = None


_previous_address: str | None = None


def _address_file() -> Path:
    from ray._private.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def connect_or_start(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (``auto`` or ``host:port``) or start a local Ray; True if started here
    (then stop it with :func:`stop_local_ray`)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    start_local_ray(num_cpus)
    return True


def epoch_metrics(res: EpochResult, cost: dict[str, Any]) -> dict[str, Any]:
    """What every report carries: the epoch's metrics plus the cumulative cost so far."""
    out = {k: v for k, v in res.metrics().items() if v is not None}
    out.update(epoch=res.epoch + 1, **cost)
    return out


def run_in_session(run_dict: dict[str, Any], *, report: Callable[..., None], get_checkpoint: Callable[[], Any],
                   checkpoint_cls: Any, rank: int, tracking_uri: str | None, parent_run_id: str | None = None,
                   extra_tags: dict[str, str] | None = None, run_key: str | None = None) -> dict[str, Any]:
    """Run one config inside a Ray session; returns the summary. Raises ``TrialFailed`` on failure.

    ``run_key`` identifies the run across restarts (see ``zosam.tracking.RunLogger``).
    """
    from zosam.runner import run

    cfg = RunConfig.from_dict(run_dict)
    if pid_dir := os.environ.get("ZOSAM_PID_DIR"):  # lets fault-tolerance tests find the worker
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / f"rank{rank}.pid").write_text(str(os.getpid()))
    restored = get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="zosam-ckpt-") as local, \
            (restored.as_directory() if restored else _null()) as restored_dir:
        resume_from = Path(restored_dir) / CHECKPOINT_FILE if restored_dir else None

        final: dict[str, Any] = {}

        def on_epoch(trainer, res: EpochResult, path: Path | None, logger) -> None:
            metrics = epoch_metrics(res, cumulative_cost(trainer))
            if logger is not None:
                metrics["mlflow_run_id"] = logger.run_id
            if res.epoch + 1 == cfg.epochs:
                # The last report waits until the run has logged its summary and ended its
                # MLflow run: a scheduler stops a trial as soon as it reports epoch == max_t
                # (ASHA), which would otherwise cut that logging off mid-way.
                final.update(metrics=metrics, path=path)
                return
            ckpt = checkpoint_cls.from_directory(str(path.parent)) if (rank == 0 and path) else None
            report(metrics, checkpoint=ckpt)

        outcome = run(cfg, checkpoint_dir=local, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                      extra_tags=extra_tags, on_epoch=on_epoch, resume_from=resume_from,
                      log=print if rank == 0 else None, run_key=run_key)
        if outcome.status == "finished" and final:
            path = final["path"]
            ckpt = checkpoint_cls.from_directory(str(path.parent)) if (rank == 0 and path) else None
            report(final["metrics"], checkpoint=ckpt)
    if outcome.status != "finished":
        raise TrialFailed(outcome.reason or "failed")
    return outcome.summary


def cumulative_cost(t) -> dict[str, Any]:
    """Training cost so far (for multi-objective sweeps: accuracy vs. cost)."""
    counts = t.optimizer.pass_counts
    return {"train_time_s": t.train_time_s, "images_per_s": t.images_seen / max(t.train_time_s, 1e-9),
            "passes_backward": counts["backward"], "passes_forward_no_grad": counts["forward_no_grad"],
            "steps": t.global_step}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker loop (``TorchTrainer``): DDP over gloo (CPU) or NCCL (GPU)."""
    import ray.train

    run_in_session(config["run"], report=ray.train.report, get_checkpoint=ray.train.get_checkpoint,
                   checkpoint_cls=ray.train.Checkpoint, rank=ray.train.get_context().get_world_rank(),
                   tracking_uri=config.get("tracking_uri"), parent_run_id=config.get("parent_run_id"),
                   extra_tags=config.get("extra_tags"), run_key=config.get("run_key"))


def make_trainer(run_dict: dict[str, Any], *, num_workers: int, use_gpu: bool, cpus_per_worker: float = 1.0,
                 name: str, storage_path: str, max_failures: int = 0, tracking_uri: str | None = None,
                 parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None,
                 callbacks: list | None = None, storage_filesystem: Any = None):
    """A ``TorchTrainer`` running :func:`train_loop_per_worker` on ``num_workers`` workers.

    A run with the same ``name`` and ``storage_path`` resumes from its last checkpoint
    (Ray Train V2 restores its checkpoint manager from storage). Ray keeps the run
    config's ``checkpoint.keep`` latest checkpoints; ``storage_filesystem`` is a pyarrow
    filesystem for ``storage_path`` (``zosam.storage.filesystem``: an S3 endpoint).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": run_dict, "tracking_uri": tracking_uri, "parent_run_id": parent_run_id,
                           "extra_tags": extra_tags, "run_key": f"train:{storage_path}/{name}"},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker,
                                                                     **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_filesystem, callbacks=callbacks or [],
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=RunConfig.from_dict(run_dict).checkpoint.keep)),
    )


def train_distributed(cfg: RunConfig, *, num_workers: int, use_gpu: bool = False, address: str | None = None,
                      tracking_uri: str | None = None, resume: bool = False, checkpoint_dir: str | None = None,
                      max_failures: int = 2):
    """``zosam train --workers N``: the same run on N Ray Train workers (DDP)."""

    from zosam.runner import RunOutcome
    from zosam.tracking import default_tracking_uri

    storage = str(Path(checkpoint_dir or Path("runs") / cfg.name / "ray").resolve())
    started = connect_or_start(address, num_cpus=max(2, num_workers + 1))
    try:
        trainer = make_trainer(cfg.to_dict(), num_workers=num_workers, use_gpu=use_gpu, name=cfg.name,
                               storage_path=storage, max_failures=max_failures,
                               tracking_uri=tracking_uri or cfg.tracking.uri or default_tracking_uri())
        if not resume and (Path(storage) / cfg.name).exists():
            raise ValueError(f"a run named {cfg.name!r} already exists in {storage}; pass --resume to continue "
                             "it or set name=<new name>")
        try:
            result = trainer.fit()
        except Exception as e:  # TrainingFailedError: the worker's reason is in the message
            print(f"run {cfg.name!r} FAILED: {e}")
            return RunOutcome("failed", {}, str(e))
        print(f"run {cfg.name!r} finished on {num_workers} workers; checkpoint: {result.checkpoint}")
        return RunOutcome("finished", dict(result.metrics or {}), checkpoint=None)
    finally:
        if started:
            stop_local_ray()
