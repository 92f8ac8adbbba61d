"""SAM (Foret et al., ICLR 2021; ASAM, Kwon et al. 2021) and the plain first-order step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from zosam.optim.base import Closure, PerturbationOptimizer, wide
from zosam.validate import in_range


class FirstOrder(PerturbationOptimizer):
    """No perturbation: one forward, one backward, one base step (the "sgd" baseline).

    It exists so that the baseline runs through the same machinery as SAM and ZO-SAM:
    the same closure API, masks, clipping, GradScaler flow and pass counting.

    Args:
        params, base_optimizer, model, max_grad_norm, **base_kwargs: as in
            :class:`~zosam.optim.base.PerturbationOptimizer`. ``model`` is unused (there
            is only the final pass) and may be ``None``.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer],
        *,
        model: nn.Module | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, {}, model=model, max_grad_norm=max_grad_norm,
                         **base_kwargs)

    def step(self, closure: Closure | None = None, *, scaler: torch.amp.GradScaler | None = None) -> Tensor:  # type: ignore[override]
        """Forward, backward, update; returns the loss."""
        closure = self._check_closure(closure)
        loss = self._forward(closure, grad=True)
        self._backward(loss, scaler)
        self._update(scaler)
        return loss.detach()


class SAM(PerturbationOptimizer):
    """Sharpness-Aware Minimization: two forward and two backward passes per step.

    ``e = rho * g / ||g||`` from the gradient ``g`` at ``w`` (adaptive: ``e = rho * w^2 g
    / ||w g||``, elementwise, ASAM), then the gradient at ``w + e`` is applied at ``w``.
    With masks, ``g`` and ``e`` are restricted to the active weights (as SSAM does),
    otherwise the perturbation would move pruned weights off zero.

    Example::

        opt = SAM(model.parameters(), torch.optim.SGD, model=model, rho=0.05,
                  lr=0.1, momentum=0.9)
        for x, y in loader:
            loss = opt.step(make_closure(model, F.cross_entropy, x, y))

    Args:
        params: parameters or parameter groups to optimise.
        base_optimizer: the ``torch.optim.Optimizer`` class applying the update.
        rho: radius of the perturbation, > 0.
        adaptive: ASAM's scale-invariant perturbation.
        model: the model (keyword, required): BatchNorm running statistics are frozen in
            the first pass, so they are updated once per step, by the final pass.
            ``None`` only for a model without BatchNorm.
        max_grad_norm: clip the applied gradient to this norm (``None``: no clipping).
        **base_kwargs: hyperparameters of ``base_optimizer`` (``lr`` ...).

    With ``torch.nn.parallel.DistributedDataParallel`` the first gradient is averaged
    across ranks like the second, so every rank perturbs identically. A first gradient
    that is zero or not finite (e.g. a GradScaler overflow) skips the perturbation for the
    step (counted in ``skipped_perturbations``).
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        model: nn.Module | None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        in_range("rho", rho, 0, low_open=True)
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive={adaptive!r} is invalid; allowed: True, False")
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive), model=model,
                         max_grad_norm=max_grad_norm, **base_kwargs)
        self.rho, self.adaptive = rho, adaptive

    @torch.no_grad()
    def _ascent(self) -> list[Tensor | None] | None:
        """``e`` from the current gradients, or ``None`` if it is zero or not finite.

        SAM: ``e = rho g / ||g||``. ASAM with ``T_w = |w|``: ``e = rho T_w^2 g / ||T_w g||``.
        """
        grads = [None if p.grad is None else self._masked(p, p.grad.detach().clone())
                 for p in self._params()]
        terms = [wide(p.abs() * g if self.adaptive else g).pow(2).sum()
                 for p, g in zip(self._params(), grads, strict=True) if g is not None]
        if not terms:
            return None
        norm = float(torch.stack([t.to(terms[0].device) for t in terms]).sum().sqrt())
        if not math.isfinite(norm) or norm == 0.0:
            return None
        return [None if g is None else (g.mul_(p.pow(2)) if self.adaptive else g).mul_(self.rho / norm)
                for p, g in zip(self._params(), grads, strict=True)]

    def step(self, closure: Closure | None = None, *, scaler: torch.amp.GradScaler | None = None) -> Tensor:  # type: ignore[override]
        """One SAM step; returns the loss at ``w + e`` (whose gradient is applied).

        ``closure()`` returns the mini-batch loss from a forward pass and must not call
        backward. With a ``GradScaler``, both backward passes are scaled (the scale
        cancels in ``g / ||g||``); the applied gradient is unscaled once, clipped and
        stepped through ``scaler.step``; call ``scaler.update()`` after ``step``.
        """
        closure = self._check_closure(closure)
        saved = self._save()
        with self._frozen_batchnorm():
            self._backward(self._forward(closure, grad=True), scaler)
        first = self._first_gradient()
        e = self._ascent()
        if e is None:
            self.skipped_perturbations += 1
        else:
            self._perturb(saved, e)
        del e
        loss = self._forward(closure, grad=True)
        self._backward(loss, scaler)
        self._restore(saved)
        self._combine_gradients(first)
        del first
        self._update(scaler)
        return loss.detach()

    def _first_gradient(self) -> Any:
        """Hook for variants (GSAM): what to keep of the gradient at ``w``; SAM keeps nothing."""
        return None

    def _combine_gradients(self, first: Any) -> None:
        """Hook for variants (GSAM): turn ``.grad`` (the gradient at ``w + e``) into the update."""
