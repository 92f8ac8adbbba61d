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
from typing import Any

import torch
from torch import Tensor, nn

from zosam.optim.base import Closure, PerturbationOptimizer, check_args, wide
from zosam.optim.flat import FlatList, l2norm, like, usable
from zosam.optim.guided import has_momentum, momentum_buffers
from zosam.optim.sam import SAM
from zosam.optim.samplers import Bernoulli, Gaussian, derive_seed
from zosam.validate import in_range


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


__all__ = ["ESAM", "GSAM", "MSAM", "RWP", "AsyncSAM", "FreeAscent", "LookSAM"]
