"""The training loop: one validated ``RunConfig`` in, one logged and resumable run out.

The same :class:`Trainer` runs in a plain process (``zosam train``) and inside a Ray Train
worker (``zosam.ray_train``): when ``torch.distributed`` is initialised it wraps the model
in DDP, shards the data by rank and lets rank 0 alone write checkpoints and MLflow.

Order of work in a step: closure -> ``optimizer.step`` (all passes, one update, masks
re-applied) -> divergence check -> ``masking.step`` (dynamic hosts drop/grow on their
schedule, with the dense gradients of this step) -> LR scheduler.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# The checkpoint file's names stay importable from here (``from zosam.engine import CHECKPOINT_FILE``).
from zosam.checkpoint import (  # noqa: F401
    CHECKPOINT_FILE,
    CHECKPOINT_KEYS,
    CheckpointError,
    read_checkpoint,
    write_checkpoint,
)
from zosam.config import RunConfig
from zosam.console import eprint, progress_bar
from zosam.data import load_dataset, make_loaders
from zosam.models import create_model
from zosam.optim import make_closure, wide
from zosam.optim.diagnostics import zo_diagnostics
from zosam.recipe import ModelEma, StepMixup, soft_target_loss, train_accuracy_targets
from zosam.sparse import Masking
from zosam.validate import ConfigError


class Diverged(RuntimeError):
    """A non-finite training or test loss: the run stops with status ``failed`` and this reason."""


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float | None
    test_acc: float | None
    lr: float
    epoch_time_s: float
    images: int
    diagnostics: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = {"train_loss": self.train_loss, "train_acc": self.train_acc, "lr": self.lr,
               "epoch_time_s": self.epoch_time_s, **self.diagnostics}
        if self.test_acc is not None:
            out.update(test_loss=self.test_loss, test_acc=self.test_acc)
        return out


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available (the local rank's GPU under DDP), else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' is invalid here: no CUDA device is available; allowed: auto, cpu")
    return torch.device("cuda", torch.cuda.current_device())


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` without ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cosine_warmup(total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> Callable[[int], float]:
    """LR multiplier at step s: linear warm-up, then cosine from ``base_lr`` to ``min_lr``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        lr = min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return lr / base_lr

    return factor


class Trainer:
    """Builds data, model, masks, optimizer and schedule from a config and trains.

    Args:
        config: the run config (already validated).
        checkpoint_dir: where checkpoints are written (rank 0); ``None`` disables them.
        on_epoch: called after every epoch with ``(EpochResult, checkpoint_path | None)``
            on every rank (Ray Train reports from there).
        log: a line printer for progress (default: stderr); ``None`` is silent.
    """

    def __init__(self, config: RunConfig, *, checkpoint_dir: str | Path | None = None,
                 on_epoch: Callable[[EpochResult, Path | None], None] | None = None,
                 log: Callable[[str], None] | None = eprint) -> None:
        self.cfg = config
        self.rank, self.world_size = rank_and_world_size()
        self.device = resolve_device(config.device)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.on_epoch = on_epoch
        # Called with each epoch's result before its checkpoint is written (the runner logs
        # the metrics there): a run killed in between never has a checkpoint ahead of MLflow.
        self.before_checkpoint: Callable[[EpochResult], None] | None = None
        self.log = log if self.rank == 0 else None
        self.history: list[EpochResult] = []
        self.start_epoch = 0
        self.global_step = 0
        self.train_time_s = 0.0
        self.images_seen = 0
        self.extra_state: dict[str, Any] = {}  # e.g. the MLflow run id, kept in checkpoints
        self._build()

    # -- construction ---------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        self.data = load_dataset(cfg.data)
        self.train_loader, self.test_loader = make_loaders(
            self.data, cfg.data, seed=cfg.seed, rank=self.rank, world_size=self.world_size, device=self.device,
            dtype=cfg.torch_dtype)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is invalid; it is larger than this worker's "
                              f"share of the training set ({self.data.label}): lower it or use more data")
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        # Model init draws from a forked global RNG seeded by the config: the run is
        # reproducible and the caller's RNG state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = create_model(cfg.model.name, num_classes=self.data.num_classes,
                                      **cfg.model.kwargs).to(self.device, cfg.torch_dtype)
        self.masking = Masking(self.model, cfg.sparse, self.total_steps, generator_seed=cfg.seed,
                               input_shape=self.data.input_shape)
        # Built before the DDP wrap: the optimizer moves the parameters into flat buffers.
        self.optimizer = cfg.optimizer.build(self.model, model=self.model, default_seed=cfg.seed)
        self.net: nn.Module = self.model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        base_lr = self.optimizer.param_groups[0]["lr"]
        warmup = round(cfg.schedule.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_warmup(self.total_steps, warmup, base_lr, cfg.schedule.min_lr))
        self.autocast = None
        self.scaler = None
        if cfg.amp != "off":
            dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
            self.autocast = torch.autocast(self.device.type, dtype=dtype)
            if cfg.amp == "fp16":
                self.scaler = torch.amp.GradScaler(self.device.type)
        self.loss_fn = _loss(cfg.label_smoothing, soft=bool(cfg.mixup or cfg.cutmix))
        self.mixup = StepMixup(self.data.num_classes, mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                               prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                               label_smoothing=cfg.label_smoothing, seed=cfg.seed, rank=self.rank) \
            if cfg.mixup or cfg.cutmix else None
        self.ema = ModelEma(self.model, cfg.model_ema_decay,
                            masks=None if cfg.sparse.is_dense else lambda: self.masking.masks) \
            if cfg.model_ema_decay else None

    @property
    def eval_model(self) -> nn.Module:
        """The weights evaluated and reported (and logged as the run's model): the EMA when
        ``model_ema_decay`` is set, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def init_masks(self) -> None:
        """Prune at init / draw the dynamic host's start (consumes training batches)."""
        if self.cfg.sparse.is_dense:
            return
        self.train_loader.set_epoch(0)
        self.masking.init_masks(iter(self.train_loader), self.loss_fn)
        self.masking.attach(self.optimizer)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "masking": self.masking.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "torch_rng": torch.get_rng_state(),
            "history": [vars(h) for h in self.history],
            "train_time_s": self.train_time_s,
            "images_seen": self.images_seen,
            "extra": self.extra_state,
            "config": self.cfg.to_dict(),
        }

    def save_checkpoint(self, epoch: int) -> Path | None:
        """Write ``checkpoint.pt`` atomically (rank 0); returns its path."""
        if self.checkpoint_dir is None or self.rank != 0:
            return None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        return write_checkpoint(self.state_dict(epoch), self.checkpoint_dir / CHECKPOINT_FILE)

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from a checkpoint: the run continues exactly as if never interrupted."""
        self.load_state(read_checkpoint(path, map_location=self.device))

    def load_state(self, ckpt: dict[str, Any]) -> None:
        """Resume from a checkpoint already read with :func:`read_checkpoint`."""
        self.model.load_state_dict(ckpt["model"])
        self.masking.load_state_dict(ckpt["masking"])
        self.masking.attach(self.optimizer)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:  # an EMA switched on at resume (--allow-config-change) starts from the weights
            self.ema.load_state_dict(ckpt.get("ema") or self.model.state_dict())
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        self.start_epoch = ckpt["epoch"] + 1
        self.global_step = ckpt["global_step"]
        self.history = [EpochResult(**h) for h in ckpt["history"]]
        self.train_time_s = ckpt["train_time_s"]
        self.images_seen = ckpt["images_seen"]
        self.extra_state = dict(ckpt["extra"])

    # -- the loop -----------------------------------------------------------------------------
    def _closure(self, x: Tensor, y: Tensor, stats: dict[str, float]):
        """The optimizer's closure; it records the accuracy of the last pass with autograd on
        the whole batch (any reduction: ESAM's per-sample pass counts too), the pass whose
        gradient the step trains on or, when that pass sees a subset, the one before it."""

        def record(out: Tensor, targets: Tensor) -> None:
            stats["correct"] = float((out.argmax(1) == train_accuracy_targets(targets)).sum())

        return make_closure(self.net, self.loss_fn, x, y, autocast=self.autocast, record=record)

    def _forward_logits(self, x: Tensor, net: nn.Module | None = None) -> Tensor:
        net = self.net if net is None else net
        if self.autocast is None:
            return net(x)
        with self.autocast:
            return net(x)

    def train_epoch(self, epoch: int) -> EpochResult:
        self.net.train()
        self.train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0.0, 0
        diags: dict[str, list[float]] = {}
        bar = progress_bar(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="step",
                           enabled=self.log is not None)
        for i, (x, y) in enumerate(self.train_loader):
            if i >= self.steps_per_epoch:
                break
            if self.mixup is not None:  # drawn once per step: every pass of the step sees this batch
                x, y = self.mixup(x, y, self.global_step)
            if self.global_step < self.cfg.eval.diagnostics_steps:
                for k, v in self.diagnostics(x, y).items():
                    diags.setdefault(k, []).append(v)
            stats: dict[str, float] = {}
            loss = self.optimizer.step(self._closure(x, y, stats), scaler=self.scaler)
            if self.scaler is not None:
                self.scaler.update()
            value = float(loss)
            if not math.isfinite(value):
                bar.close()
                raise Diverged(f"non-finite training loss ({value}) at epoch {epoch}, step {self.global_step}")
            self.masking.step(self.global_step)
            if self.ema is not None:
                self.ema.update(self.model)
            self.scheduler.step()
            self.global_step += 1
            loss_sum += value * len(y)
            correct += stats.get("correct", 0.0)
            seen += len(y)
            bar.update()
            if i % 10 == 0 and not bar.disable:
                bar.set_postfix_str(f"loss {loss_sum / seen:.4f}  acc {correct / seen:.3f}  "
                                    f"{seen * self.world_size / (time.perf_counter() - t0):.0f} img/s", refresh=False)
        bar.close()  # clears the bar: the epoch's summary line follows
        totals = self._all_reduce([loss_sum, correct, float(seen)])
        elapsed = time.perf_counter() - t0
        self.train_time_s += elapsed
        self.images_seen += int(totals[2])
        return EpochResult(epoch=epoch, train_loss=totals[0] / totals[2], train_acc=totals[1] / totals[2],
                           test_loss=None, test_acc=None, lr=self.optimizer.param_groups[0]["lr"],
                           epoch_time_s=elapsed, images=int(totals[2]),
                           diagnostics={k: sum(v) / len(v) for k, v in diags.items()})

    @torch.no_grad()
    def evaluate(self, loader=None, net: nn.Module | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) of ``net`` (default: ``eval_model``) over a loader (default: the test
        split), summed over ranks."""
        if net is None:  # the DDP wrapper for the trained weights, as in training
            net = self.eval_model if self.ema is not None else self.net
        self.net.eval()
        net.eval()
        loss_sum, correct, n = 0.0, 0.0, 0
        for x, y in loader or self.test_loader:
            out = wide(self._forward_logits(x, net))
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += float((out.argmax(1) == y).sum())
            n += len(y)
        totals = self._all_reduce([loss_sum, correct, float(n)])
        return totals[0] / max(totals[2], 1), totals[1] / max(totals[2], 1)

    def _all_reduce(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def diagnostics(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """Cosine(ZO estimate, true gradient) and the sharpness gap L(w + e) - L(w).

        Extra passes outside the optimizer's accounting; weights and BN statistics are
        left as they were. Only optimizers with ``estimate_gradient`` (ZO-SAM) report them.
        """
        return zo_diagnostics(self.optimizer, make_closure(self.net, self.loss_fn, x, y, autocast=self.autocast))

    def fit(self) -> dict[str, Any]:
        """Train from ``start_epoch`` to the end; returns the summary (see ``summary``)."""
        t_start = time.perf_counter()
        for epoch in range(self.start_epoch, self.cfg.epochs):
            res = self.train_epoch(epoch)
            last = epoch == self.cfg.epochs - 1
            if last or (epoch + 1) % self.cfg.eval.every == 0:
                res.test_loss, res.test_acc = self.evaluate()
                if self.ema is not None:  # the EMA is reported; the raw weights alongside
                    raw_loss, raw_acc = self.evaluate(net=self.net)
                    res.diagnostics.update(test_loss_raw=raw_loss, test_acc_raw=raw_acc)
                if not math.isfinite(res.test_loss):
                    raise Diverged(f"non-finite test loss ({res.test_loss}) after epoch {epoch}")
            self.history.append(res)
            if self.before_checkpoint:
                self.before_checkpoint(res)
            path = None
            if last or (epoch + 1) % self.cfg.checkpoint.every == 0:
                path = self.save_checkpoint(epoch)
            if self.log:
                test = f"  test_acc {res.test_acc:.4f}" if res.test_acc is not None else ""
                self.log(f"epoch {epoch + 1}/{self.cfg.epochs}  loss {res.train_loss:.4f}  "
                         f"train_acc {res.train_acc:.4f}{test}  {res.images / res.epoch_time_s:.0f} img/s  "
                         f"({res.epoch_time_s:.1f} s)")
            if self.on_epoch:
                self.on_epoch(res, path)
        return self.summary(time.perf_counter() - t_start)

    def summary(self, wall_time_s: float) -> dict[str, Any]:
        evaluated = [h for h in self.history if h.test_acc is not None]
        best = max(evaluated, key=lambda h: h.test_acc) if evaluated else None
        report = self.masking.report() if not self.cfg.sparse.is_dense else {}
        counts = self.optimizer.pass_counts
        out: dict[str, Any] = {
            "final_test_acc": self.history[-1].test_acc if self.history else None,
            "final_test_loss": self.history[-1].test_loss if self.history else None,
            "best_test_acc": best.test_acc if best else None,
            "best_epoch": best.epoch + 1 if best else None,
            "realised_density": report.get("global_density", 1.0),
            "active_flops": report.get("active_flops") or _dense_flops(self),
            "wall_time_s": wall_time_s,
            "train_time_s": self.train_time_s,
            "images_per_s": self.images_seen / self.train_time_s if self.train_time_s else 0.0,
            "passes_forward": counts["forward"],
            "passes_forward_no_grad": counts["forward_no_grad"],
            "passes_backward": counts["backward"],
            "skipped_perturbations": self.optimizer.skipped_perturbations,
            "steps": self.global_step,
        }
        return out

    def evaluate_corruptions(self) -> dict[str, float]:
        """Accuracy per corruption and severity on ``eval.corruptions``, and their mean."""
        from zosam.data import CorruptionSet, corruption_accuracy

        cs = CorruptionSet.open(self.cfg.eval.corruptions)
        blocks = corruption_accuracy(cs, lambda loader: self.evaluate(loader)[1],
                                     batch_size=self.cfg.data.eval_batch_size, mean=self.data.mean,
                                     std=self.data.std, device=self.device, dtype=self.cfg.torch_dtype,
                                     subset=self.cfg.eval.corruption_subset, rank=self.rank,
                                     world_size=self.world_size)
        out = {f"corrupt_acc.{k}": v for k, v in blocks.items()}
        out["corrupt_acc_mean"] = sum(out.values()) / len(out)
        out["corrupt_set_generated"] = float(cs.generated)
        return out


def _dense_flops(trainer: Trainer) -> int:
    from zosam.sparse import count_flops

    return count_flops(trainer.model, trainer.data.input_shape)


def _loss(label_smoothing: float, soft: bool = False) -> Callable[..., Tensor]:
    soft_loss = soft_target_loss() if soft else None

    def loss_fn(out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        if soft_loss is not None and y.dim() == 2:  # Mixup/CutMix targets: the smoothing is in them
            return soft_loss(wide(out), y, reduction)
        # Half-precision logits (AMP) are lifted to float32; float64 runs keep float64.
        return F.cross_entropy(wide(out), y, label_smoothing=label_smoothing, reduction=reduction)

    return loss_fn
