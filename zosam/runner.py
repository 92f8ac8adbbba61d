"""One run, end to end: Trainer + checkpoints + MLflow + the summary table.

``run(config, ...)`` is what ``zosam train`` calls and what each Ray Train worker calls
(rank 0 logs to MLflow and writes checkpoints; the other ranks only train).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zosam.config import RunConfig
from zosam.console import eprint
from zosam.engine import (
    CHECKPOINT_FILE,
    Diverged,
    EpochResult,
    Trainer,
    rank_and_world_size,
    read_checkpoint,
    resolve_device,
)
from zosam.plotting import learning_curve_figure
from zosam.tracking import (
    RunLogger,
    TrackingError,
    check_tracking_uri,
    default_tracking_uri,
    flatten,
)
from zosam.validate import ConfigError, check_writable_dir

# Fields that may differ on resume: where things are, not what is trained.
RESUME_IGNORED = {"checkpoint.dir", "checkpoint.keep", "tracking.uri", "device", "data.data_dir", "data.cache_dir",
                  "data.archive", "data.num_workers", "tracking.log_model", "tracking.system_metrics"}
CONFIG_CHANGE_TAG = "zosam.config_changed"


@dataclass
class RunOutcome:
    status: str  # finished | failed
    summary: dict[str, Any]
    reason: str | None = None
    run_id: str | None = None
    checkpoint: Path | None = None


def run_tags(cfg: RunConfig) -> dict[str, str]:
    """The tags every run carries (``zosam compare`` groups by them)."""
    return {
        "zosam.optimizer": cfg.optimizer.name,
        "zosam.host": cfg.sparse.method,
        "zosam.density": f"{1.0 if cfg.sparse.is_dense else cfg.sparse.density:g}",
        "zosam.dataset": cfg.data.name,
        "zosam.model": cfg.model.name,
        "zosam.seed": str(cfg.seed),
    }


def checkpoint_dir_for(cfg: RunConfig) -> Path:
    return Path(cfg.checkpoint.dir or Path("runs") / cfg.name)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, str | None, str | None]]:
    """``(field, old, new)`` for every run-config field whose value differs (``None``: absent),
    ignoring where-things-are fields (``RESUME_IGNORED``)."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in RESUME_IGNORED and a.get(k) != b.get(k)]


def _describe_changes(changes: list[tuple[str, str | None, str | None]]) -> str:
    return ", ".join(f"{k} ({o} -> {n})" for k, o, n in changes)


def preflight(cfg: RunConfig, *, checkpoint_dir: Path, tracking_uri: str | None, rank: int) -> str | None:
    """Everything a run needs from outside, checked before any data is loaded: the tracking
    store (reachable, its folder writable), the corruption set, the checkpoint folder
    (writable; nothing is created here). Returns the tracking URI (``None`` when not tracking here)."""
    uri = None
    if rank == 0 and cfg.tracking.enabled:
        where = "--tracking-uri" if tracking_uri else "tracking.uri" if cfg.tracking.uri else "MLFLOW_TRACKING_URI"
        uri = check_tracking_uri(where, tracking_uri or cfg.tracking.uri or default_tracking_uri())
    if cfg.eval.corruptions:
        from zosam.data import CorruptionSet

        try:
            CorruptionSet.open(cfg.eval.corruptions)
        except (OSError, ValueError) as e:
            raise ConfigError(f"eval.corruptions={cfg.eval.corruptions!r} is invalid: {e}") from None
    if rank == 0:
        where = "checkpoint.dir" if cfg.checkpoint.dir and Path(cfg.checkpoint.dir) == checkpoint_dir else \
            "--checkpoint-dir"
        check_writable_dir(where, checkpoint_dir)  # created by the first save
        (checkpoint_dir / CHECKPOINT_FILE).with_suffix(".tmp").unlink(missing_ok=True)  # left by a killed save
    return uri


def format_summary(summary: Mapping[str, Any]) -> str:
    width = max(len(k) for k in summary)
    lines = []
    for k, v in summary.items():
        if k.startswith("corrupt_acc."):
            continue
        if isinstance(v, float):
            v = f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
        lines.append(f"  {k.ljust(width)}  {v}")
    return "\n".join(lines)


def run(
    cfg: RunConfig,
    *,
    resume: bool = False,
    checkpoint_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    on_epoch: Callable[[Trainer, EpochResult, Path | None, RunLogger | None], None] | None = None,
    log: Callable[[str], None] | None = eprint,
    report: Callable[[str], None] = print,
    resume_from: str | Path | None = None,
    run_key: str | None = None,
    allow_config_change: bool = False,
) -> RunOutcome:
    """Train one config; log it to MLflow; never raise on divergence (status ``failed``).

    Args:
        resume: continue from ``checkpoint_dir/checkpoint.pt`` if it exists (and the MLflow
            run recorded in it).
        resume_from: an explicit checkpoint file to continue from (Ray Train restores).
        tracking_uri: MLflow URI (default: ``cfg.tracking.uri`` or ``default_tracking_uri()``).
        parent_run_id, extra_tags: for sweeps (child runs).
        run_key: a stable identity for the MLflow run (see ``RunLogger``); restarts of the
            same trial or Train run continue one MLflow run.
        on_epoch: called after every epoch with the trainer, the epoch's result, the
            checkpoint written (if any) and the MLflow logger (rank 0; ``None`` elsewhere).
        allow_config_change: resume although the config differs from the checkpoint's
            (refused otherwise, naming the fields); the change is recorded in MLflow.
        log: progress and status lines, failures included (default: stderr); ``None`` is
            silent, results too.
        report: the results (summary table, checkpoint path; default: stdout), on rank 0
            when ``log`` is set.

    Each epoch's metrics reach MLflow before its checkpoint is written, and a resume logs
    the epochs of the checkpoint's history that MLflow lacks (after a failed write), each
    step once. A failed MLflow write ends the run ``failed`` with the reason.

    Raises:
        ConfigError: bad input found before training (unreachable store, unwritable folder,
            unreadable checkpoint, a changed config on resume).
    """
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else checkpoint_dir_for(cfg)
    rank = rank_and_world_size()[0]
    uri = preflight(cfg, checkpoint_dir=ckpt_dir, tracking_uri=tracking_uri, rank=rank)
    existing = Path(resume_from) if resume_from else (ckpt_dir / CHECKPOINT_FILE if resume else None)
    ckpt = None
    changes: list[tuple[str, str | None, str | None]] = []
    if existing is not None and existing.is_file():
        ckpt = read_checkpoint(existing, map_location=resolve_device(cfg.device))
        changes = config_changes(ckpt["config"], cfg.to_dict())
        if changes and not allow_config_change:
            raise ConfigError(f"--resume with a changed config: {_describe_changes(changes)}; resume with the "
                              f"checkpoint's values, or pass --allow-config-change to continue with the new ones")
    trainer = Trainer(cfg, checkpoint_dir=ckpt_dir, log=log)
    if ckpt is not None:
        trainer.load_state(ckpt)
        if log and trainer.rank == 0:
            log(f"resumed from {existing} at epoch {trainer.start_epoch}")
            if changes:
                log(f"config changed on resume: {_describe_changes(changes)}")
    else:
        trainer.init_masks()
    del ckpt
    logger: RunLogger | None = None
    logged: set[int] = set()

    def log_epoch(res: EpochResult) -> None:
        step = res.epoch + 1
        if logger is not None and step not in logged:
            logger.log_metrics(res.metrics(), step=step)
            logged.add(step)

    def epoch_hook(res: EpochResult, path: Path | None) -> None:
        if on_epoch is not None:
            on_epoch(trainer, res, path, logger)

    trainer.before_checkpoint = log_epoch
    trainer.on_epoch = epoch_hook
    try:
        if uri is not None:
            logger = RunLogger(uri, cfg.tracking.experiment, cfg.name,
                               tags={**run_tags(cfg), **(extra_tags or {})}, parent_run_id=parent_run_id,
                               run_id=trainer.extra_state.get("mlflow_run_id"), run_key=run_key)
            trainer.extra_state["mlflow_run_id"] = logger.run_id
            logger.log_params(flatten(cfg.to_dict()))
            logger.log_dict(cfg.to_dict(), "config.yaml")
            logger.set_tags({"zosam.data_label": trainer.data.label})
            if cfg.tracking.system_metrics:
                logger.start_system_metrics(resume=trainer.start_epoch > 0, interval_s=cfg.tracking.system_metrics)
            if trainer.start_epoch == 0:
                logger.log_dataset(trainer.data.name, {"train": trainer.data.train, "test": trainer.data.test},
                                   source=trainer.data.label, meta=trainer.data.meta)
            if changes:
                _record_config_change(logger, changes, trainer.start_epoch)
            logged |= logger.logged_steps()
            for res in trainer.history:  # repair: epochs checkpointed but never logged (a failed write)
                log_epoch(res)
        summary = trainer.fit()
        if cfg.eval.corruptions:
            summary.update(trainer.evaluate_corruptions())
    except TrackingError as e:
        reason = str(e)
        if logger is not None:
            with contextlib.suppress(TrackingError):  # the store is gone: the next resume logs what is missing
                logger.end("failed", reason)
        if log and trainer.rank == 0:
            log(f"\nrun {cfg.name!r} FAILED: {reason}\n(the last checkpoint is kept: fix the store and "
                "resume with --resume; missing epochs are logged then)")
        return RunOutcome("failed", {}, reason, logger.run_id if logger else None)
    except Diverged as e:
        if logger is not None:
            logger.log_metrics({"diverged_at_step": trainer.global_step})
            logger.end("failed", str(e))
        if log and trainer.rank == 0:
            log(f"\nrun {cfg.name!r} FAILED: {e}")
        return RunOutcome("failed", {}, str(e), logger.run_id if logger else None)
    except SystemExit as e:  # Ray Tune stops a trial with sys.exit(0) inside its report
        if logger is not None:
            stopped = e.code in (0, None)
            if stopped and cfg.tracking.log_model:  # the scheduler's stop is this trial's end: keep its model
                with contextlib.suppress(TrackingError):
                    logger.log_model(trainer.eval_model, input_shape=trainer.data.input_shape)
            logger.end("stopped_early" if stopped else "failed",
                       f"stopped after epoch {len(trainer.history)}" if stopped else f"exited with status {e.code}")
        raise
    except BaseException as e:  # anything else: record why, then let it propagate
        if logger is not None:
            logger.end("failed", f"{type(e).__name__}: {e}")
        raise
    if logger is not None:
        try:
            _log_final(logger, trainer, summary)
            logger.end("finished")
        except TrackingError as e:
            with contextlib.suppress(TrackingError):
                logger.end("failed", str(e))
            if log and trainer.rank == 0:
                log(f"\nrun {cfg.name!r} FAILED: {e}")
            return RunOutcome("failed", summary, str(e), logger.run_id)
    if log and trainer.rank == 0:
        report(f"run {cfg.name!r} finished ({trainer.data.label}, final-epoch accuracy is the headline)")
        report(format_summary(summary))
        report(f"checkpoint: {ckpt_dir / CHECKPOINT_FILE}")
    return RunOutcome("finished", summary, None, logger.run_id if logger else None, ckpt_dir / CHECKPOINT_FILE)


def _record_config_change(logger: RunLogger, changes: list[tuple[str, str | None, str | None]],
                          start_epoch: int) -> None:
    """A resume with ``--allow-config-change``: MLflow keeps the first params (it refuses to
    change them), so the change goes into a tag and an artifact per resume."""
    logger.set_tags({CONFIG_CHANGE_TAG: f"at epoch {start_epoch}: {_describe_changes(changes)}"[:5000]})
    logger.log_dict({"resumed_at_epoch": start_epoch,
                     "changes": [{"field": k, "old": o, "new": n} for k, o, n in changes]},
                    f"config_changes/epoch_{start_epoch}.yaml")


def _log_final(logger: RunLogger, trainer: Trainer, summary: dict[str, Any]) -> None:
    model_id = (logger.log_model(trainer.eval_model, input_shape=trainer.data.input_shape)
                if trainer.cfg.tracking.log_model else None)
    logger.log_metrics({k: v for k, v in summary.items() if v is not None}, model_id=model_id)
    if not trainer.cfg.sparse.is_dense:
        report = trainer.masking.report()
        rows = ["| layer | density | weights |", "|---|---|---|"]
        for name, d in report["layer_density"].items():
            rows.append(f"| {name} | {d:.4f} | {trainer.masking.params[name].numel()} |")
        rows.append(f"| **global** | {report['global_density']:.4f} | {report['maskable_weights']} |")
        logger.log_text("\n".join(rows) + "\n", "layer_density.md")
    history = [vars(h) for h in trainer.history]
    logger.log_text(yaml.safe_dump(history, sort_keys=False), "history.yaml")
    import matplotlib.pyplot as plt

    fig = learning_curve_figure(history, trainer.cfg.name)
    logger.log_figure(fig, "learning_curves.png")
    plt.close(fig)
