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

Guided directions (``directions="guided"``, our extension; :mod:`zosam.optim.guided`)
draw ``u = sqrt(alpha) z + sqrt((1 - alpha) d / k) U a`` from the span ``U`` of k surrogate
gradients the step already holds (the gradient applied by the previous step; the base
optimizer's momentum), ``E[u u^T] = alpha I + (1 - alpha) (d / k) U U^T``. The query pairs
measure the current batch's directional derivatives along them.

Bias and variance of the two estimators (central differences, exact on a quadratic;
``g`` the batch gradient, ``P_U`` the projection onto the surrogates' span):

- Gaussian: ``E[g_hat] = g`` (unbiased); ``E||g_hat - g||^2 = (d + 1) ||g||^2 / q``, so
  the estimate is almost all noise: mean cosine with ``g`` about ``sqrt(2 / (pi d))`` at
  q = 1 and ``sqrt(q / d)`` for larger q.
- Guided: ``E[g_hat] = alpha g + (1 - alpha) (d / k) P_U g``, biased towards the
  subspace; only its direction matters (``e`` is normalised). With ``alpha = 0`` the
  estimate lies in the subspace, and with ``k = 1`` it has no direction noise at all:
  ``g_hat = d a^2 (s_hat . g) s_hat``, so ``e = rho sign(s . g) s / ||s||`` for any draw
  ``a``: the surrogate with its sign measured on this batch, cosine ``|cos(s, g)|``.
  ``alpha > 0`` adds the Gaussian estimator's noise in proportion to ``alpha``.

Measured mean cosine of ``g_hat`` with the batch gradient (the project's ``mlp``,
d = 789,258, on digits 32x32, batch 64, along 220 steps of a guided run with SGD momentum
0.9; 10 draws at each of 11 points; theory for Gaussian: ``sqrt(2 / (pi d))`` = 0.0009 at
q = 1, ``sqrt(q / d)`` = 0.0045 at q = 16):

    gaussian                           q = 1   0.0009   q = 16  0.0045
    guided, alpha 0, gradient          q = 1   0.179    (the last gradient itself: 0.179)
    guided, alpha 0, gradient+momentum q = 1   0.189
    guided, alpha 0, momentum          q = 1   0.076
    guided, alpha 0.5, gradient        q = 1   0.097    q = 16  0.174

Since ``e`` follows the surrogate, whose cosine with ``g`` is well below 1, a guided run
needs a larger ``rho`` than SAM (in a label-noise check on digits, an MLP with 40 %
symmetric noise: best rho 2 to 3 for guided q = 1, 1.5 for SAM).

Directions are drawn from a per-(seed, step, query) seed one parameter tensor at a time
from a dedicated ``torch.Generator``, straight into the weights: no d-sized buffer per
query, the global RNG is never touched, and a resumed run draws the same directions as
an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from zosam.optim.base import Closure, PerturbationOptimizer, global_norm, wide
from zosam.optim.guided import GUIDES, GuidedDirections, has_momentum, momentum_buffers
from zosam.validate import choice, in_range

DIRECTIONS = ("gaussian", "sphere", "guided")

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
        directions: ``"gaussian"`` (u ~ N(0, I)), ``"sphere"`` (uniform on the sphere of
            radius sqrt(d), d = number of active weights, so E||u||^2 matches Gaussian) or
            ``"guided"`` (our extension: Guided-ES directions from the subspace of
            surrogate gradients chosen by ``guide``, mixed with an isotropic share
            ``alpha``; see :mod:`zosam.optim.guided` and the module docstring).
        query_fraction: fraction of the mini-batch used by the query passes, in (0, 1];
            below 1 the closure must accept ``fraction=`` (see ``make_closure``).
        seed: seed of the direction stream (combine with the run's seed in configs).
        alpha: guided directions only: the isotropic share of the sampling covariance, in
            [0, 1] (default 0: directions in the surrogate subspace only).
        guide: guided directions only: the surrogates, ``"gradient"`` (default: the
            gradient applied by the previous step, unscaled and clipped, kept in
            ``state_dict``), ``"momentum"`` (the base optimizer's momentum buffer or Adam's
            ``exp_avg``; needs a base optimizer with momentum) or ``"gradient+momentum"``.
        model: the model being trained (keyword, required): BatchNorm running statistics
            are frozen during the query passes. ``None`` only for a model without
            BatchNorm (otherwise every query would update the running statistics).
        max_grad_norm: clip the applied gradient to this norm (``None``: no clipping).
        **base_kwargs: hyperparameters of ``base_optimizer`` (``lr`` ...).

    Distributed: when ``torch.distributed`` is initialised, every rank draws the same
    directions (same seed and step) and each query loss is averaged across ranks before
    ``e`` is formed, so all ranks perturb identically (2q scalars of communication).

    Guided directions without a usable surrogate (the first step; a zero or non-finite
    surrogate; momentum not yet built) fall back to the Gaussian directions of the same
    seed for that step, so the first step of a guided run is the Gaussian ZO-SAM step.
    Under DDP the surrogates are the same on every rank (the applied gradient is already
    averaged by DDP, the momentum is built from it), so all ranks draw the same ``u``.

    Random layers (dropout, drop-path): each finite-difference pair runs under a forked
    global RNG seeded with ``derive_seed(seed, step, i, 1)`` (CPU and the parameters'
    CUDA devices; with ``difference="forward"`` all queries and ``L(w)`` use query 0's
    seed), so both points of a pair see the same masks and the difference measures the
    weights, not the masks. The caller's RNG is restored afterwards: the final pass draws
    from the ordinary RNG as if the queries had not run.

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
        alpha: float = 0.0,
        guide: str = "gradient",
        *,
        model: nn.Module | None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        in_range("rho", rho, 0, low_open=True)
        in_range("mu", mu, 0, low_open=True)
        in_range("q", q, 1, integer=True)
        choice("difference", difference, ("central", "forward"))
        choice("directions", directions, DIRECTIONS)
        in_range("query_fraction", query_fraction, 0, 1, low_open=True)
        in_range("seed", seed, 0, integer=True)
        in_range("alpha", alpha, 0, 1)
        choice("guide", guide, GUIDES)
        defaults = dict(rho=rho, mu=mu, q=q)
        super().__init__(params, base_optimizer, defaults, model=model,
                         max_grad_norm=max_grad_norm, **base_kwargs)
        self.rho, self.mu, self.q = rho, mu, q
        self.difference, self.directions = difference, directions
        self.query_fraction, self.seed = query_fraction, seed
        self.alpha, self.guide = alpha, guide
        self._guided = GuidedDirections(alpha) if directions == "guided" else None
        if self._guided is not None and "momentum" in guide and not has_momentum(self.base_optimizer):
            raise ValueError(f"guide={guide!r} is invalid with a base optimizer without momentum "
                             "(SGD with momentum=0); allowed: 'gradient', or set momentum > 0")
        self._keeps_gradient = self._guided is not None and "gradient" in guide

    # -- the estimator -------------------------------------------------------------------------
    def _query_seeds(self) -> list[int]:
        return [derive_seed(self.seed, self.step_count, i) for i in range(self.q)]

    def _noise_seed(self, query: int) -> int:
        """Seed of the global RNG (dropout, drop-path) for query ``query``'s pair: every point
        of a finite-difference pair sees the same masks. Forward differences share ``L(w)``
        across queries, so all their queries use query 0's seed."""
        return derive_seed(self.seed, self.step_count, query if self.difference == "central" else 0, 1)

    @contextmanager
    def _fixed_noise(self, seed: int) -> Iterator[None]:
        """Run under a forked global RNG (CPU and the parameters' CUDA devices) seeded with
        ``seed``: the queries' random layers draw the same masks for the same seed, and the
        caller's RNG (the final pass, data augmentation) is left exactly as it was."""
        cuda = sorted({p.device.index or 0 for p in self._params() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(seed)
            for i in cuda:
                torch.cuda.default_generators[i].manual_seed(seed)
            yield

    def _query_loss(self, closure: Closure, noise_seed: int) -> float:
        """One no-grad query pass, averaged over ranks (every rank then perturbs alike)."""
        with self._fixed_noise(noise_seed):
            loss = wide(self._forward(closure, grad=False, fraction=self.query_fraction).detach())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            loss = loss.clone()
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss /= dist.get_world_size()
        return float(loss)

    def _fit_guide(self, params: list[Tensor]) -> int:
        """Fit the guided sampler to this step's surrogates; returns k (0: isotropic fallback)."""
        assert self._guided is not None
        surrogates: list[list[Tensor | None]] = []
        if "gradient" in self.guide and self.last_gradient is not None:
            surrogates.append(self.last_gradient)
        if "momentum" in self.guide:
            buffers = momentum_buffers(self.base_optimizer, params)
            if buffers is not None:
                surrogates.append(buffers)
        return self._guided.fit(params, self.masks, surrogates, self._active_count() if surrogates else 0)

    def _query_directions(self, seed: int, params: list[Tensor]) -> Iterator[Tensor]:
        """This query's directions, one parameter tensor at a time (the seeded stream)."""
        if self._guided is None:
            return self._directions(seed)
        return self._guided.directions(derive_seed(seed, 2), lambda: self._directions(seed), params)

    @torch.no_grad()
    def _estimate(self, closure: Closure, saved: list[Tensor]) -> list[Tensor] | None:
        """``g_hat = (1/q) sum_i c_i u_i``, one tensor per parameter; ``None`` if zero or not finite.

        Each direction is drawn once, straight into the weights (``w = w0 + mu u``, one
        parameter tensor at a time): the weights themselves hold the query's direction,
        so no d-sized buffer is kept per query. The minus point is ``2 w0 - (w0 + mu u)``
        and ``u`` is read back as ``(w - w0) / mu`` when it is added into ``g_hat`` (the
        one d-sized buffer), all with multi-tensor ``_foreach`` ops; the rounding of the
        read-back (about eps |w0| / mu relative) is far below the estimator's noise.
        Leaves the weights at ``w0`` (copied back exactly from ``saved``).
        """
        params = list(self._params())
        g_hat = [torch.zeros_like(p) for p in params]
        if self._guided is not None:
            self._fit_guide(params)
        d = self._active_count() if self.directions == "sphere" else 0
        finite = True
        with self._frozen_batchnorm():
            l0 = self._query_loss(closure, self._noise_seed(0)) if self.difference == "forward" else 0.0
            for i, seed in enumerate(self._query_seeds()):
                norms = []
                for p, w0, u in zip(params, saved, self._query_directions(seed, params), strict=True):
                    if d:
                        norms.append(torch.linalg.vector_norm(wide(u)))
                    torch.add(w0, u, alpha=self.mu, out=p)
                if d:  # rescale onto the sphere of radius sqrt(d): w = w0 + (w - w0) s
                    z = float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))
                    torch._foreach_sub_(params, saved)
                    torch._foreach_mul_(params, math.sqrt(d) / z if z > 0 else 0.0)
                    torch._foreach_add_(params, saved)
                noise = self._noise_seed(i)
                l_plus = self._query_loss(closure, noise)
                if self.difference == "central":
                    torch._foreach_sub_(params, saved)  # w - w0 = mu u
                    torch._foreach_neg_(params)
                    torch._foreach_add_(params, saved)  # w = w0 - mu u
                    c = (l_plus - self._query_loss(closure, noise)) / (2 * self.mu)
                    k = c / (self.q * self.mu)  # g_hat += (c / q) u, with u = (w0 - w) / mu
                    torch._foreach_add_(g_hat, saved, alpha=k)
                    torch._foreach_add_(g_hat, params, alpha=-k)
                else:
                    c = (l_plus - l0) / self.mu
                    k = c / (self.q * self.mu)  # u = (w - w0) / mu
                    torch._foreach_add_(g_hat, params, alpha=k)
                    torch._foreach_add_(g_hat, saved, alpha=-k)
                finite = finite and math.isfinite(c)
        self._restore(saved)
        if not finite:
            return None
        norm = global_norm(g_hat)
        return g_hat if math.isfinite(norm) and norm > 0 else None

    def _active_count(self) -> int:
        """Number of perturbed weights (active weights of masked tensors, all of the others)."""
        return sum(int(self.masks[p].sum()) if p in self.masks else p.numel() for p in self._params())

    def estimate_gradient(self, closure: Closure) -> list[Tensor] | None:
        """The RGE ``g_hat`` of the current step's directions, one tensor per parameter.

        A diagnostic (e.g. its cosine with the true gradient): weights, BatchNorm
        statistics, the step count and the pass counts are left unchanged.
        """
        closure = self._check_closure(closure, self.query_fraction)
        counts = dict(self._counts)
        saved = self._save()
        try:
            return self._estimate(closure, saved)
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
        saved = self._save()
        g_hat = self._estimate(closure, saved)
        if g_hat is None:
            self.skipped_perturbations += 1
        else:  # w = w0 + rho g_hat / ||g_hat|| (the weights are at w0 exactly)
            with torch.no_grad():
                torch._foreach_mul_(g_hat, self.rho / global_norm(g_hat))
                torch._foreach_add_(list(self._params()), g_hat)
        del g_hat  # free the d-sized estimate before the backward pass
        loss = self._forward(closure, grad=True)
        self._backward(loss, scaler)
        self._restore(saved)
        self._update(scaler)
        return loss.detach()
