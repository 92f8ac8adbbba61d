"""The training loop of ``zosam train`` as a Ray Train worker loop, and the local Ray it needs.

``run_in_session`` runs :func:`zosam.runner.run` inside any Ray session that has a
``report(metrics, checkpoint=...)`` and a ``get_checkpoint()``: a Ray Train worker
(``ray.train``) or a Tune function trial (``ray.tune``). Rank 0 writes the checkpoint
and reports it; every rank reports metrics (Train V2 synchronises reports across ranks).
On a restore (worker failure with ``FailureConfig(max_failures=...)``, or a resumed
sweep) the run continues from the last reported checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zosam.config import RunConfig
from zosam.console import eprint
from zosam.engine import CHECKPOINT_FILE, EpochResult

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class TrialFailed(RuntimeError):
    """A run that ended with status ``failed`` (e.g. diverged); Tune marks the trial ERROR."""


def start_local_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start an isolated local Ray bound to loopback, with its dashboard.

    The dashboard (``ray[default]``) must run: Ray Train's cleanup of a worker group whose
    Tune trial was stopped early goes through the state API it serves (stack.md, "the
    early-stopping trap"). That cleanup runs in an actor that finds the cluster without an
    address: ``RAY_ADDRESS``, else the file ``<ray temp dir>/ray_current_cluster``, which
    only ``ray start`` writes. Each local Ray started here gets a temp dir of its own
    (``RAY_TMPDIR``, inherited by its raylet and workers) and its address is recorded in
    that dir's file: the machine-wide ``/tmp/ray/ray_current_cluster`` is never touched,
    so two sweeps on one host (or a ``ray start`` beside them) do not redirect each other's
    cleanup. :func:`stop_local_ray` removes the dir.
    """
    import ray
    from ray._common.utils import get_ray_address_file

    global _own_tmpdir, _previous_tmpdir
    os.environ.setdefault(LOOPBACK_ENV, "0")  # every Ray listener on 127.0.0.1
    # Short (Ray's socket paths must stay under 108 bytes) and private to this process.
    _own_tmpdir = tempfile.mkdtemp(prefix="zr-", dir="/tmp")
    _previous_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = _own_tmpdir
    try:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=False, configure_logging=False)
    except BaseException:
        _restore_tmpdir()
        raise
    Path(get_ray_address_file(None)).write_text(ray.get_runtime_context().gcs_address)


def stop_local_ray() -> None:
    """Shut down the Ray that :func:`start_local_ray` started and remove its temp dir."""
    import ray

    ray.shutdown()
    _restore_tmpdir()


def _restore_tmpdir() -> None:
    import shutil

    global _own_tmpdir, _previous_tmpdir
    if _previous_tmpdir is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = _previous_tmpdir
    if _own_tmpdir is not None:
        shutil.rmtree(_own_tmpdir, ignore_errors=True)
    _own_tmpdir = _previous_tmpdir = None


_own_tmpdir: str | None = None
_previous_tmpdir: str | None = None


def connect_or_start(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (``auto`` or ``host:port``) or start a local Ray; True if started here
    (then stop it with :func:`stop_local_ray`)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        check_ray_address("--address", address)
        ray.init(address=address, log_to_driver=False)
        return False
    start_local_ray(num_cpus)
    return True


def check_ray_address(field: str, address: str, timeout_s: float = 5.0) -> str:
    """A ``host:port`` (or ``ray://host:port``) Ray address must answer a TCP connection within
    ``timeout_s``: Ray itself retries for minutes with a warning per attempt. ``auto`` is Ray's."""
    import socket

    from zosam.validate import ConfigError

    if address in ("auto", "local"):
        return address
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{field}={address!r} is invalid; must be host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ConfigError(f"{field}={address!r}: no Ray cluster answers there ({reason}, {timeout_s:g} s timeout)") \
            from None
    return address


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
            (restored.as_directory() if restored else contextlib.nullcontext()) as restored_dir:
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
                      log=eprint if rank == 0 else None, run_key=run_key)
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
    from zosam.tracking import check_tracking_uri, default_tracking_uri
    from zosam.validate import ConfigError

    uri = check_tracking_uri("--tracking-uri", tracking_uri or cfg.tracking.uri or default_tracking_uri())
    storage = str(Path(checkpoint_dir or Path("runs") / cfg.name / "ray").resolve())
    started = connect_or_start(address, num_cpus=max(2, num_workers + 1))
    try:
        trainer = make_trainer(cfg.to_dict(), num_workers=num_workers, use_gpu=use_gpu, name=cfg.name,
                               storage_path=storage, max_failures=max_failures, tracking_uri=uri)
        if not resume and (Path(storage) / cfg.name).exists():
            raise ConfigError(f"a run named {cfg.name!r} already exists in {storage}; pass --resume to continue "
                             "it or set name=<new name>")
        try:
            result = trainer.fit()
        except Exception as e:  # TrainingFailedError: the worker's reason is in the message
            eprint(f"run {cfg.name!r} FAILED: {e}")
            return RunOutcome("failed", {}, str(e))
        print(f"run {cfg.name!r} finished on {num_workers} workers; checkpoint: {result.checkpoint}")
        return RunOutcome("finished", dict(result.metrics or {}), checkpoint=None)
    finally:
        if started:
            stop_local_ray()
