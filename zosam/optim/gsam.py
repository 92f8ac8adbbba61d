"""GSAM, an efficient-SAM peer of ZO-SAM: SAM's gradient with a surrogate-gap ascent and
``rho`` scheduled with the learning rate.

Inner products and norms of gradients run over the *active* weights only (as in
PerturbationOptimizer._clip_grad_norm): gradients of pruned weights stay dense (RigL grows by
them) but cannot move the weights, so they must not steer the update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from zosam.optim.checks import check_args
from zosam.optim.closure import Closure
from zosam.optim.flat import FlatList, like, usable
from zosam.optim.sam import SAM
from zosam.validate import in_range


class GSAM(SAM):
    """GSAM (Zhuang et al., "Surrogate Gap Minimization Improves Sharpness-Aware
    Training", ICLR 2022): SAM's gradient minus a multiple of the plain gradient's
    component orthogonal to it, with ``rho`` following the learning rate.

    One step::

        rho_t  = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)
        g      = grad L(w);  e = rho_t g / ||g||;  g_p = grad L(w + e)
        g_orth = g - (g . g_p / ||g_p||^2) g_p             # g's part orthogonal to g_p
        w      = base_step(w, g_p - alpha g_orth)

    Descending along ``g_p`` minimises the perturbed loss; ascending along ``g_orth``
    lowers the surrogate gap ``L(w + e) - L(w)`` without changing the perturbed loss to
    first order. ``lr_t`` is read from the first parameter group at every step, so an LR
    scheduler attached to this optimizer drives ``rho_t`` (which is clamped to
    ``[rho_min, rho_max]`` if ``lr_t`` leaves ``[lr_min, lr_max]``, e.g. during warm-up
    above ``lr_max``). The current radius is ``self.rho``. With masks, ``g``, ``e`` and
    all dot products and norms are restricted to the active weights.

    Args:
        params: parameters or parameter groups to optimise.
        base_optimizer: the ``torch.optim.Optimizer`` class applying the update.
        rho_max: radius at ``lr = lr_max``, > 0.
        rho_min: radius at ``lr = lr_min``, in [0, rho_max] (default 0: ``rho`` is
            proportional to the learning rate when ``lr_min = 0``).
        alpha: weight of the surrogate-gap ascent, in [0, 1] (``alpha = 0`` is SAM with a
            scheduled ``rho``).
        lr_max: learning rate at which ``rho = rho_max``; ``None``: the first group's
            learning rate at construction (the schedule's peak for a decaying schedule).
            Must be >= ``lr_min``; ``lr_max == lr_min`` holds ``rho`` at ``rho_max``.
        lr_min: learning rate at which ``rho = rho_min``, >= 0.
        model: the model (keyword, required): BatchNorm running statistics are frozen in
            the first pass. ``None`` only for a model without BatchNorm.
        max_grad_norm: clip the applied gradient to this norm (``None``: no clipping).
        **base_kwargs: hyperparameters of ``base_optimizer`` (``lr`` ...).

    Cost per step: 2 forward + 2 backward passes (as SAM), plus one d-sized copy of ``g``.
    A first gradient that is zero or not finite skips the perturbation (counted in
    ``skipped_perturbations``).
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer],
        rho_max: float = 0.05,
        rho_min: float = 0.0,
        alpha: float = 0.1,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        *,
        model: nn.Module | None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_args(rho_max=(rho_max, "positive"), alpha=(alpha, "unit"), lr_min=(lr_min, "nonnegative"))
        in_range("rho_min", rho_min, 0, rho_max)
        super().__init__(params, base_optimizer, rho_max, model=model, max_grad_norm=max_grad_norm,
                         **base_kwargs)
        lr_max = self.param_groups[0]["lr"] if lr_max is None else lr_max
        in_range("lr_max", lr_max, lr_min)
        self.rho_max, self.rho_min, self.alpha = rho_max, rho_min, alpha
        self.lr_max, self.lr_min = float(lr_max), lr_min

    def scheduled_rho(self) -> float:
        """``rho_t`` for the first parameter group's current learning rate."""
        if self.lr_max == self.lr_min:
            return self.rho_max
        t = (float(self.param_groups[0]["lr"]) - self.lr_min) / (self.lr_max - self.lr_min)
        return self.rho_min + (self.rho_max - self.rho_min) * min(max(t, 0.0), 1.0)

    @torch.no_grad()
    def _surrogate_gap_gradient(self, g: FlatList) -> None:
        """``.grad = g_p - alpha g_orth = (1 + alpha c) g_p - alpha g``, ``c = g.g_p / ||g_p||^2``.

        With ``g_p = 0`` the projection onto it is zero (``c = 0``), so ``g_orth = g``.
        """
        g_p = self._grads_into("scratch")
        gp_sq = self._mdot(g_p, g_p)
        c = torch.where(usable(gp_sq), self._mdot(g, g_p) / gp_sq, torch.zeros_like(gp_sq))
        present = [(p.grad, v) for p, v in zip(self.params(), self._buffer("g"), strict=True) if p.grad is not None]
        grads = [gr for gr, _ in present]
        torch._foreach_mul_(grads, like(1.0 + self.alpha * c, grads[0]))
        torch._foreach_add_(grads, [v for _, v in present], alpha=-self.alpha)

    def step(self, closure: Closure | None = None, *, scaler: torch.amp.GradScaler | None = None) -> Tensor:  # type: ignore[override]
        """One GSAM step: SAM's with ``rho`` from the current lr and the surrogate-gap gradient."""
        closure = self._check_closure(closure)
        self.rho = self.scheduled_rho()
        w0 = self._save()
        with self.frozen_batchnorm():
            self._backward(self._forward(closure, grad=True), scaler)  # g = grad L(w)
        g, _ = self._ascend(w0, self.rho, keep_gradient=True)
        return self._final_pass(closure, scaler, w0, combine=lambda: self._surrogate_gap_gradient(g))

    def _wrapper_state(self) -> dict[str, Any]:
        return {**super()._wrapper_state(), "lr_max": self.lr_max}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.lr_max = float(state_dict["wrapper"]["lr_max"])


__all__ = ["GSAM"]
