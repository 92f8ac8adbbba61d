"""LookSAM, an efficient-SAM peer of ZO-SAM: SAM's gradient every k steps, its reused
sharpness component in between.

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


class LookSAM(SAM):
    """LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization",
    CVPR 2022): SAM's gradient every ``k`` steps, and in between the plain gradient plus
    the reused component of SAM's gradient orthogonal to the plain one.

    Every ``k``-th step (``t % k == 0``, starting with the first)::

        g   = grad L(w);  e = rho g / ||g||;  g_s = grad L(w + e)
        g_v = g_s - (g . g_s / ||g||^2) g                   # stored
        w   = base_step(w, g_s)

    the other steps::

        g   = grad L(w)
        w   = base_step(w, g + alpha (||g|| / ||g_v||) g_v)

    ``g_v`` is the part of SAM's gradient that the plain gradient lacks (the "sharpness"
    direction); it changes slowly, so reusing it, rescaled to the current gradient's
    norm, recovers most of SAM at about SGD's cost. With masks, ``g``, ``e`` and all dot
    products and norms are restricted to the active weights. The stored ``g_v`` is part
    of ``state_dict`` (a list of tensors), so a resumed run reuses the same component.

    Args:
        params: parameters or parameter groups to optimise.
        base_optimizer: the ``torch.optim.Optimizer`` class applying the update.
        rho: radius of the perturbation in the SAM steps, > 0.
        k: a SAM step every ``k`` steps, integer >= 1 (paper: 5; ``k = 1`` is SAM).
        alpha: weight of the reused component, >= 0 (paper: 0.7).
        model: the model (keyword, required): BatchNorm running statistics are frozen in
            the first pass of the SAM steps. ``None`` only for a model without BatchNorm.
        max_grad_norm: clip the applied gradient to this norm (``None``: no clipping).
        **base_kwargs: hyperparameters of ``base_optimizer`` (``lr`` ...).

    Cost per step: 2 forward + 2 backward passes every ``k``-th step, 1 + 1 otherwise,
    so ``1 + 1/k`` of each on average. A SAM step whose first gradient is zero or not
    finite skips the perturbation (counted in ``skipped_perturbations``) and stores no
    ``g_v``; the steps that follow then apply the plain gradient until the next SAM step.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        *,
        model: nn.Module | None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_args(k=(k, "count"), alpha=(alpha, "nonnegative"))
        super().__init__(params, base_optimizer, rho, model=model, max_grad_norm=max_grad_norm,
                         **base_kwargs)
        self.k, self.alpha = k, alpha
        self._has_orthogonal = False  # a SAM step stored g_v (its validity is a device bool)
        self._orthogonal_ok = torch.zeros((), dtype=torch.bool, device=self._skipped.device)

    @property
    def orthogonal(self) -> list[Tensor] | None:
        """``g_v`` of the last SAM step (views), ``None`` if there is none (reads a device bool)."""
        if not self._has_orthogonal or not bool(self._orthogonal_ok):
            return None
        return self._buffer("orthogonal")

    @torch.no_grad()
    def _store_orthogonal(self, g: FlatList) -> None:
        """``g_v = g_s - (g . g_s / ||g||^2) g`` with ``g_s`` in ``.grad`` (device-side validity)."""
        g_v = self._grads_into("orthogonal")  # g_s
        g_sq = self._mdot(g, g)
        ok = usable(g_sq)
        c = torch.where(ok, self._mdot(g, g_v) / g_sq, torch.zeros_like(g_sq))
        for v, gi in zip(g_v, g, strict=True):
            v.addcmul_(gi, -like(c, v))
            v.nan_to_num_(0.0, 0.0, 0.0)
        self._orthogonal_ok = ok & usable(self._mdot(g_v, g_v))
        self._has_orthogonal = True

    @torch.no_grad()
    def _add_orthogonal(self) -> None:
        """``.grad += alpha ||g|| / ||g_v|| g_v`` (a no-op without a usable stored ``g_v``)."""
        if not self._has_orthogonal:
            return
        grads = [p.grad for p in self.params()]
        g = self._grads_into("g")
        g_v = self._flat("orthogonal")
        g_norm = self._mdot(g, g).clamp(min=0).sqrt()
        v_norm = self._mdot(g_v, g_v).sqrt()
        ok = self._orthogonal_ok & torch.isfinite(g_norm) & (v_norm > 0)
        scale = torch.where(ok, self.alpha * g_norm / v_norm, torch.zeros_like(g_norm))
        present = [(gr, v) for gr, v in zip(grads, self._buffer("orthogonal"), strict=True) if gr is not None]
        torch._foreach_add_([gr for gr, _ in present],
                            torch._foreach_mul([v for _, v in present], like(scale, present[0][0])))

    def step(self, closure: Closure | None = None, *, scaler: torch.amp.GradScaler | None = None) -> Tensor:  # type: ignore[override]
        """One LookSAM step; returns the loss of the pass whose gradient is applied."""
        closure = self._check_closure(closure)
        if self.step_count % self.k != 0:  # reuse: g + alpha ||g|| / ||g_v|| g_v, one pass at w
            return self._final_pass(closure, scaler, None, combine=self._add_orthogonal)
        w0 = self._save()  # a SAM step that stores g_v
        with self.frozen_batchnorm():
            self._backward(self._forward(closure, grad=True), scaler)
        g, _ = self._ascend(w0, self.rho, keep_gradient=True)
        return self._final_pass(closure, scaler, w0, combine=lambda: self._store_orthogonal(g))

    def _wrapper_state(self) -> dict[str, Any]:
        v = self.orthogonal
        return {**super()._wrapper_state(), "orthogonal": None if v is None else [t.clone() for t in v]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        stored = state_dict["wrapper"]["orthogonal"]
        self._has_orthogonal = stored is not None
        self._orthogonal_ok = torch.tensor(stored is not None, device=self._skipped.device)
        if stored is not None:
            with torch.no_grad():
                for v, t in zip(self._buffer("orthogonal"), stored, strict=True):
                    v.copy_(t) if t is not None else v.zero_()


__all__ = ["LookSAM"]
