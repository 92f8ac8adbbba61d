"""One run, end to end: Trainer + checkpoints + MLflow + the summary table.

``run(config, ...)`` is what ``zosam train`` calls and what each Ray Train worker calls
(rank 0 logs to MLflow and writes checkpoints; the other ranks only train).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zosam.config import RunConfig
from zosam.engine import CHECKPOINT_FILE, Diverged, EpochResult, Trainer
from zosam.tracking import RunLogger, default_tracking_uri, flatten, learning_curve_figure


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
    log: Callable[[str], None] | None = print,
    resume_from: str | Path | None = None,
    run_key: str | None = None,
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
    """
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else checkpoint_dir_for(cfg)
    trainer = Trainer(cfg, checkpoint_dir=ckpt_dir, log=log)
    existing = Path(resume_from) if resume_from else (ckpt_dir / CHECKPOINT_FILE if resume else None)
    if existing is not None and existing.is_file():
        trainer.load_checkpoint(existing)
        if log and trainer.rank == 0:
            log(f"resumed from {existing} at epoch {trainer.start_epoch}")
    else:
        trainer.init_masks()
    logger: RunLogger | None = None
    if trainer.rank == 0 and cfg.tracking.enabled:
        uri = tracking_uri or cfg.tracking.uri or default_tracking_uri()
        logger = RunLogger(uri, cfg.tracking.experiment, cfg.name, tags={**run_tags(cfg), **(extra_tags or {})},
                           parent_run_id=parent_run_id, run_id=trainer.extra_state.get("mlflow_run_id"),
                           run_key=run_key)
        trainer.extra_state["mlflow_run_id"] = logger.run_id
        logger.log_params(flatten(cfg.to_dict()))
        logger.log_dict(cfg.to_dict(), "config.yaml")
        logger.set_tags({"zosam.data_label": trainer.data.label})
    # A restart (lost node, killed worker) resumes from the last checkpoint, which may be
    # older than the last epoch the lost attempt logged: log each epoch's step only once.
    logged = 0 if logger is None else max(
        (m.step for m in logger.client.get_metric_history(logger.run_id, "train_loss")), default=0)

    def epoch_hook(res: EpochResult, path: Path | None) -> None:
        if logger is not None and res.epoch + 1 > logged:
            logger.log_metrics(res.metrics(), step=res.epoch + 1)
        if on_epoch is not None:
            on_epoch(trainer, res, path, logger)

    trainer.on_epoch = epoch_hook
    try:
        summary = trainer.fit()
        if cfg.eval.corruptions:
            summary.update(trainer.evaluate_corruptions())
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
            logger.end("stopped_early" if stopped else "failed",
                       f"stopped after epoch {len(trainer.history)}" if stopped else f"exited with status {e.code}")
        raise
    except BaseException as e:  # anything else: record why, then let it propagate
        if logger is not None:
            logger.end("failed", f"{type(e).__name__}: {e}")
        raise
    if logger is not None:
        _log_final(logger, trainer, summary)
        logger.end("finished")
    if log and trainer.rank == 0:
        log(f"\nrun {cfg.name!r} finished ({trainer.data.label}, final-epoch accuracy is the headline)")
        log(format_summary(summary))
        log(f"checkpoint: {ckpt_dir / CHECKPOINT_FILE}")
    return RunOutcome("finished", summary, None, logger.run_id if logger else None, ckpt_dir / CHECKPOINT_FILE)


def _log_final(logger: RunLogger, trainer: Trainer, summary: dict[str, Any]) -> None:
    logger.log_metrics({k: v for k, v in summary.items() if v is not None})
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
