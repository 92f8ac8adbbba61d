"""Guided directions for ZO-SAM: a direction sampler over a subspace of surrogate gradients.

Guided evolution strategies (Maheswaranathan et al., "Guided evolutionary strategies:
augmenting random search with surrogate gradients", ICML 2019) draw perturbations from

    Sigma = alpha / d I + (1 - alpha) / k U U^T,

``U`` an orthonormal basis (d x k) of k surrogate gradients. :class:`GuidedDirections`
draws ``u ~ N(0, d Sigma)`` (scaled by ``d`` so that ``E||u||^2 = d``, as for ZO-SAM's
Gaussian and sphere directions: the finite-difference step ``mu`` keeps its meaning)::

    u = sqrt(alpha) z + sqrt((1 - alpha) d / k) U a,     z ~ N(0, I_d),  a ~ N(0, I_k)

into flat buffers. ``U`` is never stored: it is kept as ``U = S C``, the surrogates ``S``
(flat buffers the optimizer holds: the last applied gradient, a flat copy of the base
optimizer's momentum) times a coefficient matrix from a Gram-Schmidt pass on their Gram
matrix. Surrogates are
restricted to the active weights (``masks``); a surrogate that is zero, not finite or
(numerically) in the span of the earlier ones is dropped, so ``k`` may be smaller than
the number of surrogates, and 0 when none is usable (then the caller falls back to
isotropic directions), all decided on the device.

The sampler is deliberately separate from the ZO-SAM step (it only yields tensors
shaped like the parameters), so the step does not change with the kind of direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from zosam.optim.flat import FlatList, dot
from zosam.optim.samplers import Seeded, derive_seed

GUIDES = ("gradient", "momentum", "gradient+momentum")
"""Surrogates of guided directions: the gradient applied by the previous step, the base
optimizer's momentum (SGD's ``momentum_buffer``, Adam's ``exp_avg``), or both (k = 2)."""

Surrogate = Sequence[Tensor | None]


def momentum_buffers(base: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor | None] | None:
    """The base optimizer's first-moment buffer per parameter (SGD ``momentum_buffer``,
    Adam/AdamW ``exp_avg``); ``None`` before the first step (no buffer at all yet)."""
    out: list[Tensor | None] = []
    for p in params:
        state = base.state.get(p, {})
        buf = state.get("momentum_buffer", state.get("exp_avg"))
        out.append(buf if isinstance(buf, Tensor) else None)
    return out if any(b is not None for b in out) else None


def has_momentum(base: torch.optim.Optimizer) -> bool:
    """Whether the base optimizer keeps a first moment (SGD with momentum > 0, Adam-type)."""
    group = base.param_groups[0]
    if "momentum" in group:
        return float(group["momentum"]) > 0.0
    return "betas" in group


class GuidedDirections(Seeded):
    """Draws guided directions ``u ~ N(0, d Sigma)`` (see the module docstring) into flat
    buffers: a :class:`~zosam.optim.samplers.DirectionSampler`.

    Args:
        alpha: the isotropic share of ``Sigma``, in [0, 1]. 0: directions lie in the
            surrogate subspace (with k = 1, ``u`` is a random multiple of the surrogate);
            1: plain Gaussian directions.

    Per step: :meth:`fit` the surrogates, then :meth:`draw` once per query. Everything
    runs on the device: the Gram-Schmidt pass keeps a column per surrogate and zeroes the
    dropped ones, so ``k`` (a device tensor, read by the :attr:`k` property) never has to
    be known on the host; with ``k = 0`` the draw is the Gaussian one of the same seed.
    """

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self._k = torch.zeros((), dtype=torch.int64)
        self._surrogates: list[FlatList] = []
        self._coef = torch.zeros(0, 0, dtype=torch.float64)  # column j: U_j = S @ coef[:, j] (or 0: dropped)
        self._rank = torch.zeros(0, dtype=torch.int64)        # position of kept column j among the kept ones
        self._d = 0

    @property
    def k(self) -> int:
        """The dimension of the fitted subspace (reads the device value back)."""
        return int(self._k)

    @torch.no_grad()
    def fit(self, surrogates: Sequence[FlatList], mask: FlatList | None, d: int) -> None:
        """Orthonormalise the (masked) surrogates, flat lists like the parameters.

        ``d`` is the number of active weights (the scale of ``u``). Gram-Schmidt runs on the
        n x n Gram matrix in float64 on the device: an independent surrogate keeps a
        residual of at least 1e-6 of its norm (squared: 1e-12), else its column is zeroed;
        a zero or non-finite surrogate is dropped the same way.
        """
        if mask is not None:
            surrogates = [torch._foreach_mul(s, mask) for s in surrogates]
        n = len(surrogates)
        self._surrogates, self._d = list(surrogates), d
        if n == 0:
            self._k = torch.zeros((), dtype=torch.int64)
            self._coef = torch.zeros(0, 0, dtype=torch.float64)
            return
        dev = surrogates[0][0].device
        entries = {(i, j): dot(surrogates[i], surrogates[j]).to(dev, torch.float64)
                   for i in range(n) for j in range(i, n)}
        gram = torch.stack([torch.stack([entries[min(i, j), max(i, j)] for j in range(n)]) for i in range(n)])
        diag = gram.diagonal()
        valid = torch.isfinite(gram).all(1) & (diag > 0)
        gram = torch.where(valid[:, None] & valid[None, :], gram, torch.zeros_like(gram))
        basis: list[Tensor] = []
        kept: list[Tensor] = []
        eye = torch.eye(n, dtype=torch.float64, device=dev)
        for i in range(n):
            v = eye[i].clone()
            for c in basis:
                v = v - (c @ gram[:, i]) * c
            r2 = v @ gram @ v
            keep = valid[i] & torch.isfinite(r2) & (r2 > 1e-12 * gram[i, i])
            basis.append(torch.where(keep, v / r2.clamp(min=1e-300).sqrt(), torch.zeros_like(v)))
            kept.append(keep)
        keep_all = torch.stack(kept)
        self._coef = torch.stack(basis, 1)
        self._rank = (torch.cumsum(keep_all.long(), 0) - 1).clamp(min=0)
        self._k = keep_all.sum()

    @torch.no_grad()
    def draw(self, out: FlatList, seed: int, mask: FlatList | None) -> FlatList:
        """``u = sqrt(alpha) z + sqrt((1 - alpha) d / k) U a`` into ``out`` (masked).

        ``z ~ N(0, I)`` is ZO-SAM's Gaussian draw of ``seed``; the subspace coefficients
        ``a`` come from a CPU float64 generator seeded with ``derive_seed(seed, 2)`` (the
        same on every rank; ``a_j`` for the j-th kept surrogate). With ``k = 0`` (no usable
        surrogate) ``u = z``.
        """
        for t, gen in zip(out, self._seeded(out, seed), strict=True):
            t.normal_(generator=gen)  # z
        n = len(self._surrogates)
        if n == 0:
            return _masked(out, mask)
        dev = self._coef.device
        a = torch.randn(n, generator=torch.Generator().manual_seed(derive_seed(seed, 2)), dtype=torch.float64)
        a = a.to(dev)[self._rank]
        k = self._k.to(dev)
        b = self._coef @ a * torch.sqrt((1.0 - self.alpha) * self._d / k.clamp(min=1).double())  # u_sub = S b
        z_scale = torch.where(k > 0, math.sqrt(self.alpha), 1.0).to(out[0].dtype)
        torch._foreach_mul_(out, z_scale)
        for j, s in enumerate(self._surrogates):
            for t, sj in zip(out, s, strict=True):
                t.addcmul_(sj, b[j].to(device=t.device, dtype=t.dtype))
        return _masked(out, mask)


def _masked(out: FlatList, mask: FlatList | None) -> FlatList:
    if mask is not None:
        torch._foreach_mul_(out, mask)
    return out
