"""Random weight perturbation (RWP), a peer of ZO-SAM: SAM's two-point scheme along a random,
unsigned direction from ZO-SAM's stream."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from zosam.optim.base import PerturbationOptimizer
from zosam.optim.checks import check_args
from zosam.optim.closure import Closure
from zosam.optim.flat import l2norm, like, usable
from zosam.optim.samplers import Gaussian, derive_seed


class RWP(PerturbationOptimizer):
    """Random weight perturbation: SAM's two-point scheme with a random, unsigned direction.

    One step::

        u = N(0, I) over the active weights, from ZO-SAM's stream: seed derive_seed(seed, t, 0)
        e = rho u / ||u||
        w = base_step(w, grad L(w + e))                     # applied at w, as in SAM

    This is ZO-SAM at ``q = 1`` without the sign of the finite difference (ZO-SAM's
    ``e`` is ``sign(c) rho u / ||u||`` for the same ``u`` when seeds match), so comparing
    the two measures what the uphill sign of the estimate buys. Directions are regenerated
    from the seed rather than stored (no d-sized buffer); a resumed run draws the same
    ones. Gaussian and sphere directions coincide after normalisation.

    Args:
        params: parameters or parameter groups to optimise.
        base_optimizer: the ``torch.optim.Optimizer`` class applying the update.
        rho: radius of the perturbation, > 0.
        seed: seed of the direction stream, >= 0.
        model: the model (keyword, required); with a single (final) pass per step there
            is nothing to freeze, and ``None`` is fine for any model.
        max_grad_norm: clip the applied gradient to this norm (``None``: no clipping).
        **base_kwargs: hyperparameters of ``base_optimizer`` (``lr`` ...).

    Cost per step: 0 no-grad forwards, 1 forward + 1 backward (as SGD), plus one flat draw
    of ``u`` straight into the weights (then scaled and shifted by ``w0`` in place). With
    every weight masked (``||u|| = 0``) the perturbation is skipped (counted in
    ``skipped_perturbations``, on the device).
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        seed: int = 0,
        *,
        model: nn.Module | None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_args(rho=(rho, "positive"), seed=(seed, "seed"))
        super().__init__(params, base_optimizer, dict(rho=rho), model=model,
                         max_grad_norm=max_grad_norm, **base_kwargs)
        self.rho, self.seed = rho, seed
        self.sampler = Gaussian()

    def step(self, closure: Closure | None = None, *, scaler: torch.amp.GradScaler | None = None) -> Tensor:  # type: ignore[override]
        """One RWP step; returns the loss at ``w + e``."""
        closure = self._check_closure(closure)
        w0 = self._save()
        with torch.no_grad():  # u is drawn into the weights themselves: no d-sized buffer besides w0
            u = self.sampler.draw(self.flat.flats, derive_seed(self.seed, self.step_count, 0), self._mask)
            norm = l2norm(u)
            ok = usable(norm)
            self._skipped.add_(ok.logical_not())
            scale = torch.where(ok, self.rho / norm, torch.zeros_like(norm))
            for w, a in zip(u, w0, strict=True):
                w.mul_(like(scale, w)).add_(a)  # w = w0 + rho u / ||u||
        return self._final_pass(closure, scaler, w0)


__all__ = ["RWP"]
