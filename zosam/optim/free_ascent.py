"""The peers of ZO-SAM at SGD's cost, which ascend along a direction the step already has:
AsyncSAM (the previous step's gradient) and MSAM (the momentum), on one base, FreeAscent.

Inner products and norms of gradients run over the *active* weights only (as in
PerturbationOptimizer._clip_grad_norm): gradients of pruned weights stay dense (RigL grows by
them) but cannot move the weights, so they must not steer the update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from zosam.optim.base import PerturbationOptimizer
from zosam.optim.checks import check_args
from zosam.optim.closure import Closure
from zosam.optim.flat import FlatList, l2norm
from zosam.optim.guided import has_momentum, momentum_buffers


class FreeAscent(PerturbationOptimizer):
    """The peers whose ascent direction costs no pass: ``e = sign * rho v / ||v||`` for a
    stored direction ``v`` (:meth:`_direction`), restricted to the active weights; the
    gradient at ``w + e`` is applied at ``w``. Subclasses give ``_direction``, ``sign`` and
    ``default_rho``.

    Cost per step: 1 forward + 1 backward, 0 no-grad forwards (SGD's). Without a
    direction (the first step) or with ``v = 0`` / not finite, the step is a plain one at
    ``w`` (counted in ``skipped_perturbations``, decided on the device).
    """

    sign = 1.0
    default_rho = 0.05
    keeps_gradient = False  # AsyncSAM: v is the gradient applied by the previous step
    needs_momentum = False  # MSAM: v is the base optimizer's momentum

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer],
        rho: float | None = None,
        *,
        model: nn.Module | None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        rho = self.default_rho if rho is None else rho
        check_args(rho=(rho, "positive"))
        super().__init__(params, base_optimizer, dict(rho=rho), model=model,
                         max_grad_norm=max_grad_norm, **base_kwargs)
        if self.needs_momentum and not has_momentum(self.base_optimizer):
            raise ValueError(f"momentum=0 is invalid for {type(self).__name__.lower()} (it ascends along the base "
                             "optimizer's momentum); must be > 0, or use a base optimizer with moments (adamw)")
        self.rho = rho
        self._keeps_gradient = self.keeps_gradient

    def _direction(self) -> FlatList | None:
        raise NotImplementedError

    def step(self, closure: Closure | None = None, *, scaler: torch.amp.GradScaler | None = None) -> Tensor:  # type: ignore[override]
        """One step; returns the loss at ``w + e`` (whose gradient is applied at ``w``)."""
        closure = self._check_closure(closure)
        v = self._direction()
        if v is None:  # nothing stored yet (known on the host): a plain step
            self._skipped.add_(1)
            return self._final_pass(closure, scaler, None)
        w0 = self._save()
        with torch.no_grad():
            e = self._flat("e")
            torch._foreach_copy_(e, v)
            self._masked(e)
            self._perturb(w0, e, l2norm(e), self.sign * self.rho)
        return self._final_pass(closure, scaler, w0)


class AsyncSAM(FreeAscent):
    """AsyncSAM at zero extra passes (after Jo, Lim, Lee, "Asynchronous Sharpness-Aware
    Minimization for Fast and Accurate Deep Learning", arXiv 2503.11147): the ascent uses
    a stale gradient, staleness tau = 1.

    One step::

        e = rho g_{t-1} / ||g_{t-1}||     # g_{t-1}: the gradient applied by the previous step
        w = base_step(w, grad L(w + e))   # applied at w, as in SAM

    The paper computes ``g_{t-1}`` at ``w_{t-1}`` on a (smaller) batch, in parallel on
    another device; on one device the stale gradient available for free is the one the
    previous step applied (at ``w_{t-1} + e_{t-1}``, on the previous batch, unscaled and
    clipped). It is kept in ``state_dict`` (one d-sized buffer), so a resumed run ascends
    exactly as an uninterrupted one; under DDP it is the all-reduced gradient, the same on
    every rank. With masks, ``e`` is restricted to the active weights.

    Args:
        params: parameters or parameter groups to optimise.
        base_optimizer: the ``torch.optim.Optimizer`` class applying the update.
        rho: radius of the perturbation, > 0 (default 0.05).
        model: the model (keyword, required); with a single pass per step there is nothing
            to freeze, and ``None`` is fine for any model.
        max_grad_norm: clip the applied gradient to this norm (``None``: no clipping).
        **base_kwargs: hyperparameters of ``base_optimizer`` (``lr`` ...).

    Cost per step: 1 forward + 1 backward (SGD's). The first step (no stale gradient
    yet) is a plain step, counted in ``skipped_perturbations``.
    """

    keeps_gradient = True

    def _direction(self) -> FlatList | None:
        return self._flat("last") if self._has_last else None


class MSAM(FreeAscent):
    """Momentum-SAM (Becker, Altrichter, Wang, Beyer, "Momentum-SAM: Sharpness Aware
    Minimization without Computational Overhead", arXiv 2401.12033): the ascent runs along
    the negative momentum.

    One step, with ``v`` the base optimizer's momentum (SGD's ``momentum_buffer``,
    ``v_t = m v_{t-1} + g``, which points uphill on average; Adam's ``exp_avg``)::

        e = -rho v / ||v||
        w = base_step(w, grad L(w + e))   # applied at w, as in SAM

    The sign is the paper's (its official code evaluates the gradient at
    ``w - rho v / ||v||``): ``-v`` is the direction of the step just taken, and the
    paper shows the loss rising along it beyond the current point. The paper keeps the
    weights at the perturbed point between steps; this implementation perturbs and
    restores within the step (the same gradients, no state besides the base optimizer's).
    With masks, ``v`` and ``e`` are restricted to the active weights.

    Args:
        params: parameters or parameter groups to optimise.
        base_optimizer: the ``torch.optim.Optimizer`` class applying the update; it must
            keep a momentum (SGD with ``momentum > 0``, Adam, AdamW).
        rho: radius of the perturbation, > 0 (default 0.3, the paper's).
        model: the model (keyword, required); with a single pass per step there is nothing
            to freeze, and ``None`` is fine for any model.
        max_grad_norm: clip the applied gradient to this norm (``None``: no clipping).
        **base_kwargs: hyperparameters of ``base_optimizer`` (``lr``, ``momentum`` ...).

    Cost per step: 1 forward + 1 backward (SGD's). The first step (no momentum yet) is a
    plain step, counted in ``skipped_perturbations``. Resume: the momentum is in the base
    optimizer's state.
    """

    sign = -1.0
    default_rho = 0.3
    needs_momentum = True

    def _direction(self) -> FlatList | None:
        buffers = momentum_buffers(self.base_optimizer, self.params())
        if buffers is None:
            return None
        views = self._buffer("momentum")
        with torch.no_grad():
            torch._foreach_copy_([v for v, b in zip(views, buffers, strict=True) if b is not None],
                                 [b for b in buffers if b is not None])
        return self._flat("momentum")


__all__ = ["MSAM", "AsyncSAM", "FreeAscent"]
