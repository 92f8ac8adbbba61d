"""The efficient-SAM peers of ZO-SAM: ESAM, LookSAM, GSAM, random weight perturbation, and
the peers at SGD's cost that ascend along a direction the step already has (AsyncSAM:
the previous step's gradient; MSAM: the momentum).

Each is a :class:`~zosam.optim.base.PerturbationOptimizer` with the API of SAM and ZO-SAM
(``step(closure, *, scaler=None)``, masks, BatchNorm frozen in every pass but the final
one, pass counting, ``state_dict``), so any of them can replace SGD inside a sparse host.

Inner products and norms of gradients run over the *active* weights only (as in
:meth:`PerturbationOptimizer._clip_grad_norm`): gradients of pruned weights stay dense
(RigL grows by them) but cannot move the weights, so they must not steer the update.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from zosam.optim.base import Closure, PerturbationOptimizer, wide
from zosam.optim.guided import has_momentum, masked_dot, momentum_buffers
from zosam.optim.sam import SAM
from zosam.optim.zosam import SeededStreams, derive_seed
from zosam.validate import in_range

Grads = Sequence[Tensor | None]


def _clone_grads(params: Sequence[Tensor]) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


class ESAM(SeededStreams, SAM):
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
    (a plain step on the whole batch, counted in ``skipped_perturbations``).
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
        in_range("beta", beta, 0, 1, low_open=True)
        in_range("gamma", gamma, 0, 1, low_open=True)
        in_range("seed", seed, 0, integer=True)
        super().__init__(params, base_optimizer, rho, model=model, max_grad_norm=max_grad_norm,
                         **base_kwargs)
        self.beta, self.gamma, self.seed = beta, gamma, seed

    def _swp_masks(self) -> Iterator[Tensor]:
        """This step's Bernoulli(beta) masks, one per parameter (float32 draws for any dtype)."""

        def bernoulli(p: Tensor, gen: torch.Generator) -> Tensor:
            return (torch.rand(p.shape, generator=gen, device=p.device) < self.beta).to(p.dtype)

        return self._stream(derive_seed(self.seed, self.step_count, 0), bernoulli)

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
        saved = self._save()
        with self._frozen_batchnorm():
            before = self._per_sample(closure, grad=True) if select else None
            self._backward(before.mean() if before is not None else self._forward(closure, grad=True), scaler)
        e = self._ascent()
        subset: dict[str, Tensor] = {}
        if e is None:
            self.skipped_perturbations += 1
        else:
            if self.beta < 1.0:
                for ep, m in zip(e, self._swp_masks(), strict=True):
                    if ep is not None:
                        ep.mul_(m).div_(self.beta)
            self._perturb(saved, e)
            if before is not None:
                with self._frozen_batchnorm():
                    after = self._per_sample(closure, grad=False)
                subset["indices"] = self._sharpest(wide(after.detach() - before.detach()))
        del e
        loss = self._forward(closure, grad=True, **subset)
        self._backward(loss, scaler)
        self._restore(saved)
        self._update(scaler)
        return loss.detach()


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
        in_range("k", k, 1, integer=True)
        in_range("alpha", alpha, 0)
        super().__init__(params, base_optimizer, rho, model=model, max_grad_norm=max_grad_norm,
                         **base_kwargs)
        self.k, self.alpha = k, alpha
        self.orthogonal: list[Tensor | None] | None = None  # g_v of the last SAM step

    @torch.no_grad()
    def _orthogonal_component(self, g: Grads) -> list[Tensor | None] | None:
        """``g_s - (g . g_s / ||g||^2) g`` with ``g_s`` in ``.grad``; ``None`` if undefined."""
        params = list(self._params())
        g_s = [p.grad for p in params]
        g_sq = masked_dot(params, self.masks, g, g)
        if not math.isfinite(g_sq) or g_sq == 0.0:
            return None
        c = masked_dot(params, self.masks, g, g_s) / g_sq
        g_v = [None if s is None else (s.detach().clone() if gi is None else s.detach() - c * gi)
               for s, gi in zip(g_s, g, strict=True)]
        v_sq = masked_dot(params, self.masks, g_v, g_v)
        return g_v if math.isfinite(v_sq) and v_sq > 0.0 else None

    @torch.no_grad()
    def _add_orthogonal(self) -> None:
        """``.grad += alpha ||g|| / ||g_v|| g_v`` (a no-op without a stored ``g_v``)."""
        if self.orthogonal is None:
            return
        params = list(self._params())
        g = [p.grad for p in params]
        g_norm = math.sqrt(max(masked_dot(params, self.masks, g, g), 0.0))
        v_norm = math.sqrt(masked_dot(params, self.masks, self.orthogonal, self.orthogonal))
        if not math.isfinite(g_norm) or v_norm == 0.0:
            return
        for p, v in zip(params, self.orthogonal, strict=True):
            if p.grad is not None and v is not None:
                p.grad.add_(v.to(p.grad.dtype), alpha=self.alpha * g_norm / v_norm)

    def step(self, closure: Closure | None = None, *, scaler: torch.amp.GradScaler | None = None) -> Tensor:  # type: ignore[override]
        """One LookSAM step; returns the loss of the pass whose gradient is applied."""
        closure = self._check_closure(closure)
        if self.step_count % self.k != 0:
            loss = self._forward(closure, grad=True)
            self._backward(loss, scaler)
            self._add_orthogonal()
            self._update(scaler)
            return loss.detach()
        return super().step(closure, scaler=scaler)  # a SAM step, storing g_v via the hooks

    def _first_gradient(self) -> Grads:
        return _clone_grads(list(self._params()))

    def _combine_gradients(self, first: Grads) -> None:
        self.orthogonal = self._orthogonal_component(first)  # None after a skipped perturbation

    def _wrapper_state(self) -> dict[str, Any]:
        return {**super()._wrapper_state(), "orthogonal": self.orthogonal}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        stored = state_dict["wrapper"]["orthogonal"]
        self.orthogonal = None if stored is None else [
            None if v is None else v.to(device=p.device, dtype=p.dtype)
            for p, v in zip(self._params(), stored, strict=True)
        ]


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
        in_range("rho_max", rho_max, 0, low_open=True)
        in_range("rho_min", rho_min, 0, rho_max)
        in_range("alpha", alpha, 0, 1)
        in_range("lr_min", lr_min, 0)
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
    def _surrogate_gap_gradient(self, g: Grads) -> None:
        """``.grad = g_p - alpha g_orth = (1 + alpha c) g_p - alpha g``, ``c = g.g_p / ||g_p||^2``.

        With ``g_p = 0`` the projection onto it is zero (``c = 0``), so ``g_orth = g``.
        """
        params = list(self._params())
        g_p = [p.grad for p in params]
        gp_sq = masked_dot(params, self.masks, g_p, g_p)
        c = masked_dot(params, self.masks, g, g_p) / gp_sq if math.isfinite(gp_sq) and gp_sq > 0.0 else 0.0
        for p, gi in zip(params, g, strict=True):
            if p.grad is not None and gi is not None:
                p.grad.mul_(1.0 + self.alpha * c).add_(gi, alpha=-self.alpha)

    # SAM's step with GSAM's two hooks: rho from the current lr and a copy of ``g`` before
    # the ascent, the surrogate-gap gradient after the second backward.
    def _first_gradient(self) -> Grads:
        self.rho = self.scheduled_rho()
        return _clone_grads(list(self._params()))

    def _combine_gradients(self, first: Grads) -> None:
        self._surrogate_gap_gradient(first)

    def _wrapper_state(self) -> dict[str, Any]:
        return {**super()._wrapper_state(), "lr_max": self.lr_max}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.lr_max = float(state_dict["wrapper"]["lr_max"])


class RWP(SeededStreams):
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

    Cost per step: 0 no-grad forwards, 1 forward + 1 backward (as SGD), plus two draws of
    ``u`` (one for its norm, one to perturb). With every weight masked (``||u|| = 0``)
    the perturbation is skipped (counted in ``skipped_perturbations``).
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
        in_range("rho", rho, 0, low_open=True)
        in_range("seed", seed, 0, integer=True)
        super().__init__(params, base_optimizer, dict(rho=rho), model=model,
                         max_grad_norm=max_grad_norm, **base_kwargs)
        self.rho, self.seed = rho, seed

    @torch.no_grad()
    def _random_perturbation(self, saved: list[Tensor]) -> bool:
        """Set ``w = w0 + rho u / ||u||``; False (weights untouched) if ``||u||`` is 0."""
        seed = derive_seed(self.seed, self.step_count, 0)
        sq = [wide(u).pow(2).sum() for u in self._directions(seed)]  # u freed one by one
        norm = math.sqrt(float(torch.stack([t.to(sq[0].device) for t in sq]).sum())) if sq else 0.0
        if not math.isfinite(norm) or norm == 0.0:
            return False
        # Streamed a second time rather than kept: no d-sized buffer besides the saved w.
        for p, w0, u in zip(self._params(), saved, self._directions(seed, self.rho / norm), strict=True):
            torch.add(w0, u, out=p)
        return True

    def step(self, closure: Closure | None = None, *, scaler: torch.amp.GradScaler | None = None) -> Tensor:  # type: ignore[override]
        """One RWP step; returns the loss at ``w + e``."""
        closure = self._check_closure(closure)
        saved = self._save()
        if not self._random_perturbation(saved):
            self.skipped_perturbations += 1
        loss = self._forward(closure, grad=True)
        self._backward(loss, scaler)
        self._restore(saved)
        self._update(scaler)
        return loss.detach()


class FreeAscent(PerturbationOptimizer):
    """Shared step (no ``__init__`` of its own) of the peers whose ascent direction costs no
    pass: ``e = sign * rho v / ||v||`` for a stored direction ``v`` (:meth:`_direction`),
    restricted to the active weights; the gradient at ``w + e`` is applied at ``w``.

    Cost per step: 1 forward + 1 backward, 0 no-grad forwards (SGD's). Without a
    direction (the first step) or with ``v = 0`` / not finite, the step is a plain one at
    ``w`` (counted in ``skipped_perturbations``).
    """

    rho: float
    sign = 1.0

    def _direction(self) -> list[Tensor | None] | None:
        raise NotImplementedError

    @torch.no_grad()
    def _free_ascent(self) -> list[Tensor | None] | None:
        v = self._direction()
        if v is None:
            return None
        params = list(self._params())
        norm = math.sqrt(max(masked_dot(params, self.masks, v, v), 0.0))
        if not math.isfinite(norm) or norm == 0.0:
            return None
        scale = self.sign * self.rho / norm
        return [None if vi is None else self._masked(p, vi.to(p.dtype) * scale)
                for p, vi in zip(params, v, strict=True)]

    def step(self, closure: Closure | None = None, *, scaler: torch.amp.GradScaler | None = None) -> Tensor:  # type: ignore[override]
        """One step; returns the loss at ``w + e`` (whose gradient is applied at ``w``)."""
        closure = self._check_closure(closure)
        saved = self._save()
        e = self._free_ascent()
        if e is None:
            self.skipped_perturbations += 1
        else:
            self._perturb(saved, e)
        del e
        loss = self._forward(closure, grad=True)
        self._backward(loss, scaler)
        self._restore(saved)
        self._update(scaler)
        return loss.detach()


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
        rho: radius of the perturbation, > 0.
        model: the model (keyword, required); with a single pass per step there is nothing
            to freeze, and ``None`` is fine for any model.
        max_grad_norm: clip the applied gradient to this norm (``None``: no clipping).
        **base_kwargs: hyperparameters of ``base_optimizer`` (``lr`` ...).

    Cost per step: 1 forward + 1 backward (SGD's). The first step (no stale gradient
    yet) is a plain step, counted in ``skipped_perturbations``.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        *,
        model: nn.Module | None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        in_range("rho", rho, 0, low_open=True)
        super().__init__(params, base_optimizer, dict(rho=rho), model=model,
                         max_grad_norm=max_grad_norm, **base_kwargs)
        self.rho = rho
        self._keeps_gradient = True

    def _direction(self) -> list[Tensor | None] | None:
        return self.last_gradient


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
        rho: radius of the perturbation, > 0 (the paper's default: 0.3).
        model: the model (keyword, required); with a single pass per step there is nothing
            to freeze, and ``None`` is fine for any model.
        max_grad_norm: clip the applied gradient to this norm (``None``: no clipping).
        **base_kwargs: hyperparameters of ``base_optimizer`` (``lr``, ``momentum`` ...).

    Cost per step: 1 forward + 1 backward (SGD's). The first step (no momentum yet) is a
    plain step, counted in ``skipped_perturbations``. Resume: the momentum is in the base
    optimizer's state.
    """

    sign = -1.0

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.3,
        *,
        model: nn.Module | None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        in_range("rho", rho, 0, low_open=True)
        super().__init__(params, base_optimizer, dict(rho=rho), model=model,
                         max_grad_norm=max_grad_norm, **base_kwargs)
        if not has_momentum(self.base_optimizer):
            raise ValueError("momentum=0 is invalid for msam (it ascends along the base optimizer's momentum); "
                             "must be > 0, or use a base optimizer with moments (adamw)")
        self.rho = rho

    def _direction(self) -> list[Tensor | None] | None:
        return momentum_buffers(self.base_optimizer, list(self._params()))


__all__ = ["ESAM", "GSAM", "MSAM", "RWP", "AsyncSAM", "FreeAscent", "LookSAM"]
