"""``Masking``: owns a model's masks from initialisation to the last update.

Life cycle, as the training loop uses it::

    masking = Masking(model, SparsityConfig.from_dict(cfg["sparse"]), total_steps, seed)
    masking.init_masks(batches, loss_fn)      # prune at init, or random start (DST)
    masking.attach(optimizer)                 # the optimizer's masks follow every update
    for step in range(total_steps):
        optimizer.step(closure)               # re-applies the masks itself
        masking.step(step)                    # DST: drop/grow on schedule
    ckpt["masking"] = masking.state_dict()    # plain tensors and python values

Distributed: decisions are broadcast from rank 0 (and data-dependent scores are averaged
over ranks first), so every rank holds identical masks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from zosam.sparse import dst
from zosam.sparse.config import SparsityConfig
from zosam.sparse.distributions import layer_counts
from zosam.sparse.flops import count_flops
from zosam.sparse.masks import (
    Maskable,
    apply_masks,
    broadcast_masks,
    maskable_parameters,
    reset_optimizer_state,
    topk_mask,
    weight_layers,
)
from zosam.sparse.methods import DST_RULES, PRUNERS
from zosam.sparse.pruners import Batch, LossFn, PruneContext

_STATE_VERSION = 1


class Masking:
    """The masks of one model under one :class:`SparsityConfig`.

    Args:
        model: the model; its maskable weights are chosen by ``maskable_parameters``.
        config: the sparsity schedule (``method="dense"`` makes every call a no-op).
        total_steps: optimizer steps of the whole run (for the drop schedule and
            ``end_fraction``), >= 1.
        generator_seed: seed of the dedicated CPU generator behind every random choice
            (random pruning, the random start of dynamic hosts, random growth).
        input_shape: one sample's shape, for SynFlow and FLOPs; when ``None`` it is taken
            from the first batch given to :meth:`init_masks`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SparsityConfig,
        total_steps: int,
        generator_seed: int = 0,
        *,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        if not isinstance(config, SparsityConfig):
            raise ValueError(f"config={type(config).__name__} is invalid; must be a SparsityConfig")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps={total_steps!r} is invalid; must be an integer >= 1")
        self.model = model
        self.config = config
        self.total_steps = total_steps
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.generator = torch.Generator().manual_seed(int(generator_seed))
        self.params: dict[str, nn.Parameter] = (
            {}
            if config.is_dense
            else maskable_parameters(
                model,
                dense_first_layer=config.dense_first_layer,
                dense_classifier=config.dense_classifier,
            )
        )
        if not config.is_dense and not self.params:
            raise ValueError("the model has no maskable conv/linear weight for sparse training")
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        self.target_counts: dict[str, int] = (
            layer_counts(shapes, config.density, config.distribution, config.power_scale)
            if self.params
            else {}
        )
        self.masks: dict[str, Tensor] = {
            n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()
        }
        self.counts: dict[str, int] = {n: p.numel() for n, p in self.params.items()}
        self.optimizers: list[Any] = []
        self.changed_last_update = 0
        self.last_update_step = -1
        self.num_updates = 0
        self._dense_flops: int | None = None

    # -- setup -------------------------------------------------------------------------
    def init_masks(
        self, batches: Iterable[Batch] | None = None, loss_fn: LossFn | None = None
    ) -> None:
        """Build the initial masks and zero the pruned weights.

        Static hosts score weights (data-dependent ones consume ``batches``); dynamic hosts
        start from random masks at the layer counts. ``dense`` does nothing.
        """
        it: Iterator[Batch] | None = None
        if batches is not None:
            it = iter(batches)
            first = next(it, None)
            if first is not None:
                if self.input_shape is None:
                    self.input_shape = tuple(first[0].shape[1:])
                it = itertools.chain([first], it)
        if self.config.is_dense:
            return
        if self.config.is_dynamic:
            # DST starts from random masks at the distribution's layer counts.
            scores = {
                n: torch.rand(p.shape, generator=self.generator).to(p.device)
                for n, p in self.params.items()
            }
            masks = {n: topk_mask(s, self.target_counts[n]) for n, s in scores.items()}
        else:
            ctx = PruneContext(
                model=self.model,
                params=self.params,
                counts=self.target_counts,
                config=self.config,
                generator=self.generator,
                batches=it,
                loss_fn=loss_fn,
                input_shape=self.input_shape,
            )
            masks = PRUNERS.get(self.config.method)(ctx)
        masks = broadcast_masks(masks)
        self.counts = self._checked_counts(masks)
        self.masks = {n: m.to(self.params[n].device) for n, m in masks.items()}
        self._push()

    def attach(self, optimizer: Any) -> None:
        """Make ``optimizer``'s masks follow this masking (now and after every update).

        :class:`~zosam.sparse.masks.Maskable` optimizers (those of ``zosam.optim``) apply
        the masks after each step themselves; with a plain torch optimizer :meth:`step`
        applies them.
        """
        if optimizer not in self.optimizers:
            self.optimizers.append(optimizer)
        if isinstance(optimizer, Maskable):
            optimizer.set_masks(self.param_masks() or None)

    # -- per step ----------------------------------------------------------------------
    def param_masks(self) -> dict[nn.Parameter, Tensor]:
        """``{weight: mask}`` (the form ``set_masks`` and ``apply_masks`` take)."""
        return {self.params[n]: m for n, m in self.masks.items()}

    def apply(self) -> None:
        """Zero every pruned weight (:func:`~zosam.sparse.masks.apply_masks`)."""
        apply_masks(self.param_masks())

    def step(self, step: int) -> bool:
        """Call after optimizer step ``step`` (0-based). Returns True if the masks changed.

        Re-applies the masks when no attached optimizer does it, then, for a dynamic
        host on its update schedule, drops and grows weights: grown weights start at
        zero and the optimizer state of every changed position is reset. RigL and MEST
        read ``p.grad`` as left by the step (dense; under SAM/ZO-SAM it is the gradient
        at the perturbed point, the one the update applied).
        """
        if self.config.is_dense:
            return False
        if not any(isinstance(o, Maskable) for o in self.optimizers):
            self.apply()
        if not self.config.is_dynamic or not dst.is_update_step(
            self.config, step, self.total_steps
        ):
            return False
        fraction = dst.drop_fraction_at(self.config, step, self.total_steps)
        new, changed = self._updated_masks(fraction)
        new = broadcast_masks(new)
        self.counts = self._checked_counts(new)
        self._swap(new)
        self.changed_last_update = changed
        self.last_update_step = step
        self.num_updates += 1
        return changed > 0

    def _updated_masks(self, fraction: float) -> tuple[dict[str, Tensor], int]:
        method = self.config.method
        ctx = dst.UpdateContext(masks=self.masks, counts=self.counts, params=self.params, fraction=fraction,
                                config=self.config, random=dst.uniform_scores(self.generator),
                                grads=lambda: self._grads(method))
        return DST_RULES.get(method)(ctx)

    def _grads(self, method: str) -> dict[str, Tensor]:
        missing = [n for n, p in self.params.items() if p.grad is None]
        if missing:
            raise RuntimeError(
                f"sparse.method={method!r} needs the dense gradients of the last step, but "
                f"{missing[0]} has none: call masking.step(step) after optimizer.step and "
                "before zero_grad"
            )
        # A GradScaler-skipped step leaves inf/NaN gradients: rank them as zero.
        return {n: torch.nan_to_num(p.grad.detach(), 0.0, 0.0, 0.0) for n, p in self.params.items()}

    @torch.no_grad()
    def _swap(self, new: dict[str, Tensor]) -> None:
        """Install ``new`` masks: zero grown and dropped weights, reset their optimizer state."""
        for n, m in new.items():
            p = self.params[n]
            m = m.to(p.device)
            diff = m ^ self.masks[n]
            p.masked_fill_(diff, 0)  # dropped weights become 0; grown ones start at 0
            reset_optimizer_state(self.optimizers, p, diff)
            self.masks[n] = m
        self._push()

    def _push(self) -> None:
        """Apply the masks to the weights and hand them to every attached optimizer."""
        self.apply()
        for opt in self.optimizers:
            if isinstance(opt, Maskable):
                opt.set_masks(self.param_masks())

    def _checked_counts(self, masks: dict[str, Tensor]) -> dict[str, int]:
        """Per-layer active counts (one device synchronisation); asserts the global total."""
        if not masks:
            return {}
        counts = dict(zip(masks, torch.stack([m.sum() for m in masks.values()]).tolist(), strict=True))
        got, want = sum(counts.values()), sum(self.target_counts.values())
        if got != want:
            raise AssertionError(f"masks keep {got} weights, target {want}")
        return counts

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Masks and schedule state as plain tensors/python (``weights_only`` loadable)."""
        return {
            "version": _STATE_VERSION,
            "config": self.config.to_dict(),
            "masks": {n: m.detach().cpu().clone() for n, m in self.masks.items()},
            "generator": self.generator.get_state(),
            "changed_last_update": self.changed_last_update,
            "last_update_step": self.last_update_step,
            "num_updates": self.num_updates,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masks onto the same model, apply them and push them to optimizers."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"masking state version {state.get('version')!r} is not supported")
        for key in ("method", "density"):
            saved, ours = state["config"][key], getattr(self.config, key)
            if saved != ours:
                raise ValueError(f"checkpoint has sparse.{key}={saved!r}, run has {ours!r}")
        masks = state["masks"]
        if set(masks) != set(self.params):
            raise ValueError(
                "checkpoint masks do not match the model's maskable weights: "
                f"{sorted(set(masks) ^ set(self.params))[:3]}"
            )
        for n, m in masks.items():
            if tuple(m.shape) != tuple(self.params[n].shape):
                raise ValueError(f"checkpoint mask {n} has shape {tuple(m.shape)}")
        self.masks = {n: masks[n].to(self.params[n].device).bool() for n in self.params}
        self.counts = self._checked_counts(self.masks)
        self.generator.set_state(state["generator"].cpu())  # map_location may have moved it
        self.changed_last_update = int(state["changed_last_update"])
        self.last_update_step = int(state["last_update_step"])
        self.num_updates = int(state["num_updates"])
        if state.get("input_shape") is not None and self.input_shape is None:
            self.input_shape = tuple(state["input_shape"])
        self._push()

    # -- reporting ---------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Densities, the last update's changes and FLOPs (``None`` without an input shape).

        Keys: ``layer_density`` (``{name: density}`` of the maskable weights),
        ``global_density`` (over maskable weights), ``overall_density`` (over all
        conv/linear weights, dense layers included), ``active_weights``,
        ``maskable_weights``, ``changed_last_update``, ``last_update_step``,
        ``num_updates``, ``active_flops``, ``dense_flops``.
        """
        active = self.counts
        maskable = sum(p.numel() for p in self.params.values())
        all_weights = sum(m.weight.numel() for _, m in weight_layers(self.model))
        pruned = maskable - sum(active.values())
        out: dict[str, Any] = {
            "layer_density": {n: active[n] / self.params[n].numel() for n in self.params},
            "global_density": sum(active.values()) / maskable if maskable else 1.0,
            "overall_density": (all_weights - pruned) / all_weights if all_weights else 1.0,
            "active_weights": sum(active.values()),
            "maskable_weights": maskable,
            "changed_last_update": self.changed_last_update,
            "last_update_step": self.last_update_step,
            "num_updates": self.num_updates,
            "active_flops": None,
            "dense_flops": None,
        }
        if self.input_shape is not None:
            if self._dense_flops is None:
                self._dense_flops = count_flops(self.model, self.input_shape)
            out["dense_flops"] = self._dense_flops
            out["active_flops"] = count_flops(self.model, self.input_shape, self.masks)
        return out
