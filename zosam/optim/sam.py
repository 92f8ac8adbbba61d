"""SAM (Foret et al., ICLR 2021; ASAM, Kwon et al. 2021) and the plain first-order step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from zosam.optim.base import PerturbationOptimizer
from zosam.optim.checks import check_args
from zosam.optim.closure import Closure
from zosam.optim.flat import FlatList, l2norm


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
        return self._final_pass(self._check_closure(closure), scaler, None)


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
    step (counted in ``skipped_perturbations``), decided on the device without a host sync.
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
        check_args(rho=(rho, "positive"), adaptive=(adaptive, "bool"))
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive), model=model,
                         max_grad_norm=max_grad_norm, **base_kwargs)
        self.rho, self.adaptive = rho, adaptive

    @torch.no_grad()
    def _ascend(self, w0: FlatList, rho: float | Tensor, *, keep_gradient: bool = False,
                select: FlatList | None = None) -> tuple[FlatList, Tensor]:
        """Set ``w = w0 + e`` from the gradient in ``.grad``; returns (the flat gradient, ``ok``).

        SAM: ``e = rho g / ||g||``; ASAM with ``T_w = |w|``: ``e = rho T_w^2 g / ||T_w g||``,
        ``g`` restricted to the active weights. ``select`` (ESAM's weight masks) multiplies
        ``e`` after the norm is taken. ``keep_gradient``: the returned gradient is the dense,
        unmasked ``g`` (LookSAM and GSAM combine it later), else it may be overwritten.
        A zero or non-finite ``||g||`` leaves ``w = w0`` (``ok`` false, counted).
        """
        g = self._grads_into("g")
        e = (torch._foreach_mul(g, self._mask) if self._mask is not None else [t.clone() for t in g]) \
            if keep_gradient else self._masked(g)
        w = self.flat.flats
        if self.adaptive:
            norm = l2norm([x.abs().mul_(d) for x, d in zip(w, e, strict=True)])
            for d, x in zip(e, w, strict=True):
                d.mul_(x.square())
        else:
            norm = l2norm(e)
        if select is not None:
            torch._foreach_mul_(e, select)
        ok = self._perturb(w0, e, norm, rho)
        return g, ok

    def step(self, closure: Closure | None = None, *, scaler: torch.amp.GradScaler | None = None) -> Tensor:  # type: ignore[override]
        """One SAM step; returns the loss at ``w + e`` (whose gradient is applied).

        ``closure()`` returns the mini-batch loss from a forward pass and must not call
        backward. With a ``GradScaler``, both backward passes are scaled (the scale
        cancels in ``g / ||g||``); the applied gradient is unscaled once, clipped and
        stepped through ``scaler.step``; call ``scaler.update()`` after ``step``.
        """
        closure = self._check_closure(closure)
        w0 = self._save()
        with self.frozen_batchnorm():
            self._backward(self._forward(closure, grad=True), scaler)  # g = grad L(w)
        self._ascend(w0, self.rho)                                    # w = w0 + rho g / ||g||
        return self._final_pass(closure, scaler, w0)                  # grad L(w + e), applied at w0
