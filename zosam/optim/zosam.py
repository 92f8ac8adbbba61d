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

Directions are drawn from a per-(seed, step, query) seed as one flat draw per parameter
buffer (:mod:`zosam.optim.samplers`) from a dedicated ``torch.Generator``: the global RNG
is never touched, and a resumed run draws the same directions as an uninterrupted one.
The loss differences, ``||g_hat||`` and the skip of a zero or non-finite estimate stay on
the device: a step reads nothing back to the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from zosam.optim.base import PerturbationOptimizer
from zosam.optim.checks import check_args
from zosam.optim.closure import Closure
from zosam.optim.flat import FlatList, l2norm, like, sq_norm, usable, wide
from zosam.optim.guided import GUIDES, GuidedDirections, has_momentum, momentum_buffers
from zosam.optim.samplers import DirectionSampler, derive_seed, sampler

DIRECTIONS = ("gaussian", "sphere", "guided")

class ZOSAM(PerturbationOptimizer):
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
        **base_kwargs: hyperparameters of ``base_optimizer`` (``lr`` ...), and ``compile``
            (``"none"`` or ``"graphs"``: the query passes replayed from a CUDA graph, see
            :mod:`zosam.optim.graphs`).

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
        check_args(rho=(rho, "positive"), mu=(mu, "positive"), q=(q, "count"),
                   difference=(difference, ("central", "forward")), directions=(directions, DIRECTIONS),
                   query_fraction=(query_fraction, "fraction"), seed=(seed, "seed"), alpha=(alpha, "unit"),
                   guide=(guide, GUIDES))
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
        self.sampler: DirectionSampler = self._guided if self._guided is not None else sampler(directions)
        self._graphs = None
        if self.compile == "graphs":
            from zosam.optim.graphs import GraphedQueries

            self._graphs = GraphedQueries(self.flat.flats[0].device)

    # -- the estimator -------------------------------------------------------------------------
    def _noise_seed(self, query: int) -> int:
        """Seed of the global RNG (dropout, drop-path) for query ``query``'s pair: every point
        of a finite-difference pair sees the same masks. Forward differences share ``L(w)``
        across queries, so all their queries use query 0's seed."""
        return derive_seed(self.seed, self.step_count, query if self.difference == "central" else 0, 1)

    @contextmanager
    def _forked_rng(self) -> Iterator[None]:
        """Run under a forked global RNG (CPU and the parameters' CUDA devices): the queries'
        random layers draw from seeds of their own (:meth:`_reseed`), and the caller's RNG
        (the final pass, data augmentation) is left exactly as it was."""
        cuda = sorted({p.device.index or 0 for p in self.params() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda):
            self._cuda_rng = cuda
            yield

    def _reseed(self, seed: int) -> None:
        torch.default_generator.manual_seed(seed)
        for i in self._cuda_rng:
            torch.cuda.default_generators[i].manual_seed(seed)

    def _loss(self, closure: Closure, noise_seed: int) -> Tensor:
        """One no-grad query pass (random layers seeded with ``noise_seed``), averaged over
        ranks (every rank then perturbs alike); stays on the device."""
        self._reseed(noise_seed)
        out = self._graphs.loss(closure, self.query_fraction) if self._graphs is not None else None
        if out is not None:  # replayed: the static output is overwritten by the next replay
            self._counts["forward_no_grad"] += 1
            lifted = wide(out)
            loss = lifted.clone() if lifted is out else lifted
        else:
            loss = wide(self._forward(closure, grad=False, fraction=self.query_fraction).detach())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            loss = loss.clone()
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss /= dist.get_world_size()
        return loss

    def _fit_guide(self) -> None:
        """Fit the guided sampler to this step's surrogates (none: Gaussian fallback)."""
        assert self._guided is not None
        surrogates: list[FlatList] = []
        if "gradient" in self.guide and self._has_last:
            surrogates.append(self._flat("last"))
        if "momentum" in self.guide:
            buffers = momentum_buffers(self.base_optimizer, self.params())
            if buffers is not None:
                views = self._buffer("momentum")
                torch._foreach_copy_([v for v, b in zip(views, buffers, strict=True) if b is not None],
                                     [b for b in buffers if b is not None])
                surrogates.append(self._flat("momentum"))
        self._guided.fit(surrogates, self._mask, self.active)

    @torch.no_grad()
    def _estimate(self, closure: Closure, w0: FlatList) -> tuple[FlatList, Tensor]:
        """``g_hat = (1/q) sum_i c_i u_i`` into a flat buffer (MeZO's zo_step, q times):
        perturb +, loss, perturb -, loss, accumulate; the weights end at ``w0`` exactly.
        Returns ``g_hat`` and a device bool, false if a loss difference was not finite (that
        query then adds nothing, so ``g_hat`` stays finite, and the step skips)."""
        if self._guided is not None:
            self._fit_guide()
        if self.directions == "sphere":
            self.sampler.active = self.active  # type: ignore[attr-defined]
        w, u = self.flat.flats, self._flat("u")
        g_hat = u if self.q == 1 else self._flat("g_hat")  # q = 1: g_hat = (c / q) u, scaled in place
        mu = self.mu
        finite: Tensor | None = None
        with self.frozen_batchnorm(), self._forked_rng():
            l0 = self._loss(closure, self._noise_seed(0)) if self.difference == "forward" else None
            for i in range(self.q):
                self.sampler.draw(u, derive_seed(self.seed, self.step_count, i), self._mask)
                noise = self._noise_seed(i)
                for a, b, d in zip(w, w0, u, strict=True):
                    torch.add(b, d, alpha=mu, out=a)                  # w = w0 + mu u
                l_plus = self._loss(closure, noise)
                if l0 is None:
                    for a, b, d in zip(w, w0, u, strict=True):
                        torch.add(b, d, alpha=-mu, out=a)             # w = w0 - mu u
                    c = (l_plus - self._loss(closure, noise)) / (2 * mu)  # central difference
                else:
                    c = (l_plus - l0) / mu                            # forward difference
                ok = torch.isfinite(c)
                finite = ok if finite is None else finite & ok
                k = torch.where(ok, c / self.q, torch.zeros_like(c))
                for g, d in zip(g_hat, u, strict=True):
                    if i == 0:
                        torch.mul(d, like(k, g), out=g)               # g_hat = (c / q) u
                    else:
                        g.addcmul_(d, like(k, g))                     # g_hat += (c / q) u
        self._restore(w0)
        assert finite is not None
        return g_hat, finite

    def estimate_gradient(self, closure: Closure) -> list[Tensor] | None:
        """The RGE ``g_hat`` of the current step's directions, one tensor per parameter
        (copies), or ``None`` if it is zero or not finite (reads its norm back).

        A diagnostic (e.g. its cosine with the true gradient, :mod:`zosam.optim.diagnostics`):
        weights, BatchNorm statistics, the step count and the pass counts are left unchanged.
        """
        closure = self._check_closure(closure, self.query_fraction)
        counts = dict(self._counts)
        w0 = self._save()
        try:
            g_hat, finite = self._estimate(closure, w0)
            if not bool(usable(sq_norm(g_hat)) & finite):
                return None
            return [v.clone() for v in self.flat.views(g_hat)]
        finally:
            self._restore(w0)
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
        w0 = self._save()
        g_hat, finite = self._estimate(closure, w0)        # 2q no-grad forwards
        self._perturb(w0, g_hat, l2norm(g_hat), self.rho,  # w = w0 + rho g_hat / ||g_hat||
                      may_be_nonfinite=False, valid=finite)
        return self._final_pass(closure, scaler, w0)       # grad L(w + e), applied at w0
