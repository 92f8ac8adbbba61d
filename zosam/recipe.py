"""Training-recipe pieces from timm that the loop applies: Mixup/CutMix, model EMA, decay groups.

These are DeiT's (Touvron et al. 2021, ``facebookresearch/deit`` main.py), built from timm:

- :class:`StepMixup`: timm's ``Mixup`` (Mixup/CutMix with label smoothing folded into soft
  targets), drawn once per optimizer step, before the closure, so every pass of SAM/ZO-SAM
  in that step sees the same mixed batch and targets. timm draws ``lam``, the
  Mixup/CutMix switch and the CutMix box from NumPy's *global* ``RandomState``; each call
  runs under a fork of that state seeded from ``(seed, step, rank)`` and restores it
  afterwards. So timm's own code runs unmodified (what DeiT ran), the draw is a pure
  function of ``(seed, step, rank)`` (resuming at step t redraws step t's mix) and the
  caller's NumPy state is untouched. Re-implementing the draws with a dedicated
  ``numpy.random.Generator`` would copy most of timm's ``Mixup`` (its box sampler calls
  ``np.random`` directly). The fork is not thread-safe: another thread drawing from
  ``np.random`` during the call would interleave (nothing in a training process does).
- :func:`soft_target_loss`: timm's ``SoftTargetCrossEntropy`` for soft targets
  (``reduction="none"``, which ESAM's data selection needs, uses torch's equal
  ``F.cross_entropy`` with probability targets).
- :class:`ModelEma`: timm's ``ModelEmaV3`` (constant decay, as DeiT's ``ModelEma``),
  restricted to the sparse masks after every update so that the averaged model is as
  sparse as the trained one.
- :func:`weight_decay_groups`: timm's ``param_groups_weight_decay`` with the model's
  ``no_weight_decay()`` names: norms, biases (every 1-D tensor), ``pos_embed`` and
  ``cls_token`` get no weight decay (timm's ``create_optimizer(filter_bias_and_bn=True)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIXUP_MODES = ("batch", "pair", "elem")
_MIXUP_SALT = 0x6D697875  # "mixu": keeps this stream apart from others seeded by (seed, step)


@contextmanager
def forked_numpy_rng(*words: int) -> Iterator[None]:
    """Run the block with NumPy's global ``RandomState`` seeded from ``words``; restore it after."""
    state = np.random.get_state()
    np.random.seed(np.random.SeedSequence([int(w) & 0xFFFFFFFFFFFFFFFF for w in words]).generate_state(8))
    try:
        yield
    finally:
        np.random.set_state(state)


class StepMixup:
    """timm ``Mixup``/CutMix, reproducible from ``(seed, step, rank)``.

    ``mixup(x, y, step) -> (mixed x, soft targets (B, num_classes))``. ``x`` is mixed in
    place (timm's behaviour); the batch size must be even. ``label_smoothing`` is folded
    into the soft targets (use :func:`soft_target_loss`, not a smoothed loss, on them).
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float, cutmix_alpha: float, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", label_smoothing: float = 0.1,
                 seed: int = 0, rank: int = 0) -> None:
        from timm.data import Mixup

        self.mix = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                         mode=mode, label_smoothing=label_smoothing, num_classes=num_classes)
        self.seed, self.rank = seed, rank

    def __call__(self, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, Tensor]:
        with forked_numpy_rng(_MIXUP_SALT, self.seed, step, self.rank):
            x, soft = self.mix(x, y)
        return x, soft.to(x.dtype) if x.is_floating_point() else soft


def soft_target_loss() -> Callable[..., Tensor]:
    """Cross-entropy against soft targets: ``loss(out, targets, reduction="mean")`` is timm's
    ``SoftTargetCrossEntropy``; ``reduction="none"`` gives per-sample losses (ESAM's data
    selection) with torch's ``F.cross_entropy`` on probability targets, the same sum
    ``-sum(t * log_softmax(out))``."""
    from timm.loss import SoftTargetCrossEntropy

    mean_loss = SoftTargetCrossEntropy()

    def loss_fn(out: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        if reduction == "none":
            return F.cross_entropy(out, targets, reduction="none")
        return mean_loss(out, targets)

    return loss_fn


def train_accuracy_targets(targets: Tensor) -> Tensor:
    """Class labels to score train accuracy against: the labels, or the argmax of soft
    targets (after Mixup: the class with the larger share, lam >= 1/2)."""
    return targets.argmax(1) if targets.dim() == 2 else targets


class ModelEma:
    """An exponential moving average of a model's weights (timm ``ModelEmaV3``), kept sparse.

    Args:
        model: the trained model (not its DDP wrapper); the EMA starts as a copy of it.
        decay: per-step decay (DeiT: 0.99996), constant from the first step.
        masks: ``{parameter name: bool mask}`` source, called after each update (the
            sparse host's current masks); ``None`` for a dense model.
    """

    def __init__(self, model: nn.Module, decay: float,
                 masks: Callable[[], Mapping[str, Tensor]] | None = None) -> None:
        from timm.utils import ModelEmaV3

        # float32 EMA for half-precision models: a bf16 EMA cannot hold (1 - decay) * delta.
        dtype = torch.float32 if next(model.parameters()).dtype in (torch.float16, torch.bfloat16) else None
        self.ema = ModelEmaV3(model, decay=decay, dtype=dtype)
        self.masks = masks
        self._params = dict(self.ema.module.named_parameters())

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.ema.update(model)  # no step: a constant decay, as DeiT's ModelEma
        if self.masks is not None:
            for name, mask in self.masks().items():
                self._params[name].mul_(mask)

    def state_dict(self) -> dict[str, Tensor]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.ema.module.load_state_dict(state)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups without weight decay on norms, biases and the model's
    ``no_weight_decay()`` names (timm ViTs: ``pos_embed``, ``cls_token``), via timm's
    ``param_groups_weight_decay``; the rest gets ``weight_decay``."""
    from timm.optim import param_groups_weight_decay

    skip = getattr(model, "no_weight_decay", lambda: set())()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
