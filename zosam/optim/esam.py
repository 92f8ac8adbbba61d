"""ESAM, an efficient-SAM peer of ZO-SAM: SAM with stochastic weight perturbation and
sharpness-sensitive data selection.

Inner products and norms of gradients run over the *active* weights only (as in
PerturbationOptimizer._clip_grad_norm): gradients of pruned weights stay dense (RigL grows by
them) but cannot move the weights, so they must not steer the update.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from zosam.optim.checks import check_args
from zosam.optim.closure import Closure
from zosam.optim.flat import wide
from zosam.optim.sam import SAM
from zosam.optim.samplers import Bernoulli, derive_seed


class ESAM(SAM):
    """Efficient SAM (Du et al., "Efficient Sharpness-aware Minimization for Improved
    Training of Neural Networks", ICLR 2022): SAM with stochastic weight perturbation
    (SWP) and sharpness-sensitive data selection (SDS).

    One step, with ``g = grad L_B(w)`` and per-sample losses ``l_i``::

        m_j   ~ Bernoulli(beta), per weight                # SWP: a fresh mask every step
        e     = (rho / beta) m * g / ||g||                  # unbiased: E[e] = SAM's e
        B+    = the ceil(gamma |B|) samples with the largest l_i(w + e) - l_i(w)
        w     = base_step(w, grad L_{B+}(w + e))            # applied at w, as in SAM

    This is the paper's per-weight formulation (``e_hat = m * e / beta``); the authors'
    code instead drops whole parameter tensors from the next step's backward passes,
    which is where its speed-up comes from. With a per-weight mask, SWP changes the
    perturbation but saves no compute on dense hardware; SDS saves the part of the second
    forward/backward that the unselected samples would cost.

    The Bernoulli masks come from a dedicated generator seeded with
    ``derive_seed(seed, step, 0)``, so a resumed run draws the same masks. With masks
    (sparse training), ``g``, ``||g||`` and ``e`` are restricted to the active weights.
    ``beta = gamma = 1`` is SAM exactly.

    Args:
        params: parameters or parameter groups to optimise.
        base_optimizer: the ``torch.optim.Optimizer`` class applying the update.
        rho: radius of SAM's perturbation before the ``1/beta`` rescaling, > 0.
        beta: SWP probability that a weight is perturbed, in (0, 1] (paper: 0.6).
        gamma: SDS fraction of the batch used by the second pass, in (0, 1] (paper: 0.5).
            Below 1 the closure must accept ``reduction="none"`` (per-sample losses) and
            ``indices=`` (a subset of the batch), as ``make_closure``'s does.
        seed: seed of the SWP mask stream, >= 0.
        model: the model (keyword, required): BatchNorm running statistics are frozen in
            every pass but the final one. ``None`` only for a model without BatchNorm.
        max_grad_norm: clip the applied gradient to this norm (``None``: no clipping).
        **base_kwargs: hyperparameters of ``base_optimizer`` (``lr`` ...).

    Cost per step: 2 forward + 2 backward passes, the second pair on ``ceil(gamma B)``
    samples, plus (``gamma < 1``) 1 no-grad forward at ``w + e`` for the selection.
    A first gradient that is zero or not finite skips the perturbation and the selection
    (a plain step on the whole batch, counted in ``skipped_perturbations``); with
    ``gamma < 1`` that decision is read back (one host sync per step: the size of the
    selected batch depends on it).
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        beta: float = 0.6,
        gamma: float = 0.5,
        seed: int = 0,
        *,
        model: nn.Module | None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_args(beta=(beta, "fraction"), gamma=(gamma, "fraction"), seed=(seed, "seed"))
        super().__init__(params, base_optimizer, rho, model=model, max_grad_norm=max_grad_norm,
                         **base_kwargs)
        self.beta, self.gamma, self.seed = beta, gamma, seed
        self.sampler = Bernoulli(beta)  # SWP: this step's weight masks

    def _per_sample(self, closure: Closure, *, grad: bool) -> Tensor:
        losses = self._forward(closure, grad=grad, reduction="none")
        if losses.ndim != 1:
            raise ValueError(
                f"esam: closure(reduction='none') must return one loss per sample (a 1-D tensor), "
                f"got shape {tuple(losses.shape)}"
            )
        return losses

    def _sharpest(self, increase: Tensor) -> Tensor:
        """Indices (ascending) of the ``ceil(gamma n)`` samples with the largest loss increase."""
        k = max(1, math.ceil(self.gamma * increase.numel() - 1e-9))  # 1e-9: 0.7 * 10 is 7.000...1
        return torch.topk(increase.float(), k).indices.sort().values

    def step(self, closure: Closure | None = None, *, scaler: torch.amp.GradScaler | None = None) -> Tensor:  # type: ignore[override]
        """One ESAM step; returns the loss of the selected samples at ``w + e``."""
        select = self.gamma < 1.0
        closure = self._check_closure(closure, keywords=("reduction", "indices") if select else (),
                                      why="esam with gamma < 1")
        w0 = self._save()
        with self.frozen_batchnorm():
            before = self._per_sample(closure, grad=True) if select else None
            self._backward(before.mean() if before is not None else self._forward(closure, grad=True), scaler)
        swp = self.sampler.draw(self._flat("swp"), derive_seed(self.seed, self.step_count, 0), None) \
            if self.beta < 1.0 else None
        _, ok = self._ascend(w0, self.rho / self.beta, select=swp)  # e = (rho / beta) m * g / ||g||
        subset: dict[str, Tensor] = {}
        if before is not None and bool(ok):  # the one host sync: the selected batch's size depends on it
            with self.frozen_batchnorm():
                after = self._per_sample(closure, grad=False)
            subset["indices"] = self._sharpest(wide(after.detach() - before.detach()))
        return self._final_pass(closure, scaler, w0, **subset)


__all__ = ["ESAM"]
