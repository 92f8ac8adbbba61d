"""ZO-SAM: SAM whose ascent direction is a zeroth-order random gradient estimate (RGE).

One step (``../shared/docs/method.md``)::

    c_i   = (L(w + mu u_i) - L(w - mu u_i)) / (2 mu)        # central, 2q no-grad forwards
          = (L(w + mu u_i) - L(w)) / mu                     # forward, q + 1 no-grad forwards
    g_hat = (1/q) sum_i c_i u_i                             # E[g_hat] ~ grad L for u ~ N(0, I)
    e     = rho g_hat / ||g_hat||                           # SAM's normalised ascent
    g     = grad L(w + e)                                   # the step's only backward
    w     = base_step(w, g)                                 # applied at w, as in SAM

Why the estimate is unbiased for Gaussian u: a Taylor expansion gives
``c_i = u_i . grad L + O(mu^2)`` (central; the even terms cancel), and
``E[u u^T] = I`` so ``E[(u . g) u] = g``. The cosine of ``g_hat`` with the true gradient
is about ``sqrt(q / d)``; restricting ``u`` to the active weights of a sparse model
shrinks ``d`` to the number of active weights.

Directions are regenerated from a per-(seed, step, query) seed one parameter tensor at a
time from a dedicated ``torch.Generator``: no d-sized buffer per query, the global RNG
is never touched, and a resumed run draws the same directions as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from zosam.optim.base import Closure, PerturbationOptimizer
from zosam.validate import choice, in_range

_MASK64 = (1 << 64) - 1


def derive_seed(*values: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 finaliser on a running hash).

    Gives well-separated streams for neighbouring ``(seed, step, query)`` triples, which
    ``seed + step`` arithmetic would not (``(0, 1)`` and ``(1, 0)`` would collide).
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


class SeededStreams(PerturbationOptimizer):
    """Shared machinery (no ``__init__``, no ``step``): random tensors shaped like the
    parameters, regenerated from a seed one parameter tensor at a time.

    One dedicated ``torch.Generator`` per device is re-seeded per stream, so two streams
    with the same seed yield the same tensors (no d-sized buffer has to be kept between
    uses) and the global RNG is never touched. Seeds come from
    ``derive_seed(seed, step, i)``, so a resumed run draws what an uninterrupted one would.
    Used by ZO-SAM and RWP (Gaussian directions) and ESAM (Bernoulli weight masks).
    """

    _generators: dict[torch.device, torch.Generator]

    def _generator(self, device: torch.device) -> torch.Generator:
        if not hasattr(self, "_generators"):  # created lazily: the class has no __init__
            self._generators = {}
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def _stream(self, seed: int, draw: Callable[[Tensor, torch.Generator], Tensor]) -> Iterator[Tensor]:
        """Yield ``draw(p, generator)`` for each parameter ``p``, masked to active weights."""
        seeded: set[torch.device] = set()
        for p in self._params():
            gen = self._generator(p.device)
            if p.device not in seeded:
                gen.manual_seed(seed)
                seeded.add(p.device)
            yield self._masked(p, draw(p, gen))

    def _directions(self, seed: int, scale: float = 1.0) -> Iterator[Tensor]:
        """Yield ``scale * u``, ``u ~ N(0, I)``, one parameter tensor at a time, masked."""

        def gaussian(p: Tensor, gen: torch.Generator) -> Tensor:
            u = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
            return u.mul_(scale) if scale != 1.0 else u

        return self._stream(seed, gaussian)


class ZOSAM(SeededStreams):
    """Zeroth-order SAM: one backward pass per step.

    Example::

        opt = ZOSAM(model.parameters(), torch.optim.SGD, model=model, rho=0.05, mu=1e-3,
                    lr=0.1, momentum=0.9, weight_decay=5e-4)
        for x, y in loader:
            loss = opt.step(make_closure(model, F.cross_entropy, x, y))

    Args:
        params: parameters or parameter groups to optimise.
        base_optimizer: the ``torch.optim.Optimizer`` class that applies the update (SGD
            with momentum, AdamW, ...), built with ``**base_kwargs``.
        rho: radius of the ascent step ``e`` (SAM's rho), > 0.
        mu: smoothing scale, the finite-difference step along each direction, > 0.
        q: number of random directions (queries) per step, >= 1.
        difference: ``"central"`` (two-sided, 2q no-grad forwards, O(mu^2) bias) or
            ``"forward"`` (one-sided, q + 1 no-grad forwards, O(mu) bias).
        directions: ``"gaussian"`` (u ~ N(0, I)) or ``"sphere"`` (uniform on the sphere of
            radius sqrt(d), d = number of active weights, so E||u||^2 matches Gaussian).
        query_fraction: fraction of the mini-batch used by the query passes, in (0, 1];
            below 1 the closure must accept ``fraction=`` (see ``make_closure``).
        seed: seed of the direction stream (combine with the run's seed in configs).
        model: the model being trained (keyword, required): BatchNorm running statistics
            are frozen during the query passes. ``None`` only for a model without
            BatchNorm (otherwise every query would update the running statistics).
        max_grad_norm: clip the applied gradient to this norm (``None``: no clipping).
        **base_kwargs: hyperparameters of ``base_optimizer`` (``lr`` ...).

    Distributed: when ``torch.distributed`` is initialised, every rank draws the same
    directions (same seed and step) and the query losses are averaged across ranks before
    ``e`` is formed, so all ranks perturb identically (2q scalars of communication).

    A step whose estimate is zero (all query losses equal) or not finite is taken without
    perturbation (a plain step at ``w``) and counted in ``skipped_perturbations``.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        mu: float = 1e-3,
        q: int = 1,
        difference: str = "central",
        directions: str = "gaussian",
        query_fraction: float = 1.0,
        seed: int = 0,
        *,
        model: nn.Module | None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        in_range("rho", rho, 0, low_open=True)
        in_range("mu", mu, 0, low_open=True)
        in_range("q", q, 1, integer=True)
        choice("difference", difference, ("central", "forward"))
        choice("directions", directions, ("gaussian", "sphere"))
        in_range("query_fraction", query_fraction, 0, 1, low_open=True)
        in_range("seed", seed, 0, integer=True)
        defaults = dict(rho=rho, mu=mu, q=q)
        super().__init__(params, base_optimizer, defaults, model=model,
                         max_grad_norm=max_grad_norm, **base_kwargs)
        self.rho, self.mu, self.q = rho, mu, q
        self.difference, self.directions = difference, directions
        self.query_fraction, self.seed = query_fraction, seed
        self._scales: dict[int, float] = {}  # per-query direction scale of the current step

    # -- directions --------------------------------------------------------------------------
    def _scale(self, seed: int) -> float:
        """1 for Gaussian directions; sqrt(d) / ||z|| to put a sphere direction at radius sqrt(d)."""
        if self.directions == "gaussian":
            return 1.0
        sq, d = 0.0, 0
        for p, z in zip(self._params(), self._directions(seed), strict=True):
            sq += float(z.float().pow(2).sum())
            m = self.masks.get(p)
            d += int(m.sum()) if m is not None else p.numel()
        return math.sqrt(d / sq) if sq > 0 else 0.0

    def _query_seeds(self) -> list[int]:
        return [derive_seed(self.seed, self.step_count, i) for i in range(self.q)]

    # -- the estimator -------------------------------------------------------------------------
    @torch.no_grad()
    def _shift(self, saved: list[Tensor], seed: int, alpha: float) -> None:
        """Set ``w = w0 + alpha * u`` from the saved weights (no drift across queries)."""
        for p, w0, u in zip(self._params(), saved, self._directions(seed, self._scales[seed]), strict=True):
            torch.add(w0, u, alpha=alpha, out=p)

    def _query_coefficients(self, closure: Closure, saved: list[Tensor], seeds: list[int]) -> Tensor:
        """Finite-difference coefficients ``c_i`` (a length-q tensor), averaged over ranks."""
        f = self.query_fraction
        losses = []
        with self._frozen_batchnorm():
            if self.difference == "forward":
                losses.append(self._forward(closure, grad=False, fraction=f).detach().float())
            for s in seeds:
                self._shift(saved, s, self.mu)
                losses.append(self._forward(closure, grad=False, fraction=f).detach().float())
                if self.difference == "central":
                    self._shift(saved, s, -self.mu)
                    losses.append(self._forward(closure, grad=False, fraction=f).detach().float())
        self._restore(saved)
        losses_t = torch.stack(losses)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(losses_t, op=dist.ReduceOp.SUM)
            losses_t /= dist.get_world_size()
        if self.difference == "central":
            return (losses_t[0::2] - losses_t[1::2]) / (2 * self.mu)
        return (losses_t[1:] - losses_t[0]) / self.mu

    @torch.no_grad()
    def _combine(self, coeffs: Tensor, seeds: list[int]) -> list[Tensor] | None:
        """``g_hat = (1/q) sum_i c_i u_i`` per tensor; ``None`` if zero or not finite."""
        if not bool(torch.isfinite(coeffs).all()) or not bool((coeffs != 0).any()):
            return None
        c = (coeffs / self.q).tolist()
        streams = [self._directions(s, self._scales[s]) for s in seeds]
        g_hat = []
        for _ in self._params():
            g = next(streams[0]).mul_(c[0])
            for ci, stream in zip(c[1:], streams[1:], strict=True):
                g.add_(next(stream), alpha=ci)
            g_hat.append(g)
        norm_sq = sum(float(g.float().pow(2).sum()) for g in g_hat)
        if not math.isfinite(norm_sq) or norm_sq == 0.0:
            return None
        return g_hat

    def estimate_gradient(self, closure: Closure) -> list[Tensor] | None:
        """The RGE ``g_hat`` of the current step's directions, one tensor per parameter.

        A diagnostic (e.g. its cosine with the true gradient): weights, BatchNorm
        statistics, the step count and the pass counts are left unchanged.
        """
        closure = self._check_closure(closure, self.query_fraction)
        counts = dict(self._counts)
        seeds = self._query_seeds()
        self._scales = {s: self._scale(s) for s in seeds}
        saved = self._save()
        try:
            return self._combine(self._query_coefficients(closure, saved, seeds), seeds)
        finally:
            self._restore(saved)
            self._counts = counts

    # -- the step ------------------------------------------------------------------------------
    def step(self, closure: Closure | None = None, *, scaler: torch.amp.GradScaler | None = None) -> Tensor:  # type: ignore[override]
        """One ZO-SAM step; returns the loss at the perturbed point (whose gradient is applied).

        Args:
            closure: ``closure(fraction=1.0)`` returns the mini-batch loss from a forward
                pass; it must not call backward.
            scaler: an optional ``torch.amp.GradScaler``. The single backward is scaled,
                gradients are unscaled once, clipped, and ``scaler.step`` applies them;
                call ``scaler.update()`` after ``step`` as usual.
        """
        closure = self._check_closure(closure, self.query_fraction)
        seeds = self._query_seeds()
        self._scales = {s: self._scale(s) for s in seeds}
        saved = self._save()
        g_hat = self._combine(self._query_coefficients(closure, saved, seeds), seeds)
        if g_hat is None:
            self.skipped_perturbations += 1
        else:
            norm = math.sqrt(sum(float(g.float().pow(2).sum()) for g in g_hat))
            self._perturb(saved, [g.mul_(self.rho / norm) for g in g_hat])
        del g_hat  # free the d-sized estimate before the backward pass
        loss = self._forward(closure, grad=True)
        self._backward(loss, scaler)
        self._restore(saved)
        self._update(scaler)
        return loss.detach()
