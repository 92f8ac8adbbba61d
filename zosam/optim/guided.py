"""Guided directions for ZO-SAM: a direction sampler over a subspace of surrogate gradients.

Guided evolution strategies (Maheswaranathan et al., "Guided evolutionary strategies:
augmenting random search with surrogate gradients", ICML 2019) draw perturbations from

    Sigma = alpha / d I + (1 - alpha) / k U U^T,

``U`` an orthonormal basis (d x k) of k surrogate gradients. :class:`GuidedDirections`
draws ``u ~ N(0, d Sigma)`` (scaled by ``d`` so that ``E||u||^2 = d``, as for ZO-SAM's
Gaussian and sphere directions: the finite-difference step ``mu`` keeps its meaning)::

    u = sqrt(alpha) z + sqrt((1 - alpha) d / k) U a,     z ~ N(0, I_d),  a ~ N(0, I_k)

one parameter tensor at a time. ``U`` is never stored: it is kept as ``U = S C``, the
surrogate tensors ``S`` (buffers the optimizer already holds: the last applied gradient,
the base optimizer's momentum) times a k x k coefficient matrix from a Gram-Schmidt
pass on their Gram matrix, so the sampler adds no d-sized buffer. Surrogates are
restricted to the active weights (``masks``); a surrogate that is zero, not finite or
(numerically) in the span of the earlier ones is dropped, so ``k`` may be smaller than
the number of surrogates, and 0 when none is usable (then the caller falls back to
isotropic directions).

The sampler is deliberately separate from the ZO-SAM step (it only yields tensors
shaped like the parameters), so the step does not change with the kind of direction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from zosam.optim.base import wide

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


def masked_dot(params: Sequence[Tensor], masks: Mapping[Tensor, Tensor], a: Surrogate, b: Surrogate) -> float:
    """``sum_i a_i . b_i`` over the active weights (``None`` counts as zero), accumulated in
    at least float32 (float64 stays float64), moved to one device and read back once."""
    terms = []
    for p, x, y in zip(params, a, b, strict=True):
        if x is None or y is None:
            continue
        prod = wide(x) * wide(y)
        m = masks.get(p)
        terms.append((prod if m is None else prod * m).sum())
    if not terms:
        return 0.0
    dev = terms[0].device
    return float(torch.stack([t.to(dev) for t in terms]).sum())


class GuidedDirections:
    """Draws guided directions ``u ~ N(0, d Sigma)`` (see the module docstring).

    Args:
        alpha: the isotropic share of ``Sigma``, in [0, 1]. 0: directions lie in the
            surrogate subspace (with k = 1, ``u`` is a random multiple of the surrogate);
            1: plain Gaussian directions.

    Per step: :meth:`fit` the surrogates, then :meth:`directions` once per query.
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.k = 0
        self._surrogates: list[Surrogate] = []
        self._coef = torch.zeros(0, 0, dtype=torch.float64)  # column j: U_j = S @ coef[:, j]
        self._masks: Mapping[Tensor, Tensor] = {}
        self._d = 0

    @torch.no_grad()
    def fit(self, params: Sequence[Tensor], masks: Mapping[Tensor, Tensor], surrogates: Sequence[Surrogate],
            d: int) -> int:
        """Orthonormalise the (masked) surrogates; returns ``k``, the subspace's dimension.

        ``d`` is the number of active weights (the scale of ``u``). Gram-Schmidt runs on the
        k x k Gram matrix in float64: an independent surrogate keeps a residual of at
        least 1e-6 of its norm (squared: 1e-12), else it is dropped.
        """
        n = len(surrogates)
        gram = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(i, n):
                gram[i, j] = gram[j, i] = masked_dot(params, masks, surrogates[i], surrogates[j])
        basis: list[Tensor] = []
        kept: list[int] = []
        for i in range(n):
            if not math.isfinite(float(gram[i, i])) or float(gram[i, i]) <= 0.0:
                continue
            v = torch.zeros(n, dtype=torch.float64)
            v[i] = 1.0
            for c in basis:
                v -= (c @ gram[:, i]) * c
            r2 = float(v @ gram @ v)
            if math.isfinite(r2) and r2 > 1e-12 * float(gram[i, i]):
                basis.append(v / math.sqrt(r2))
                kept.append(i)
        self.k = len(basis)
        self._surrogates = list(surrogates)
        self._coef = torch.stack(basis, 1) if basis else torch.zeros(n, 0, dtype=torch.float64)
        self._masks, self._d = masks, d
        return self.k

    def directions(self, seed: int, isotropic: Callable[[], Iterator[Tensor]],
                   params: Sequence[Tensor]) -> Iterator[Tensor]:
        """Yield ``u`` one parameter tensor at a time (masked, in the parameter's dtype).

        ``isotropic()`` yields this query's ``z ~ N(0, I)`` (ZO-SAM's seeded Gaussian
        stream); ``seed`` seeds the k subspace coefficients (a CPU float64 generator, the
        same on every rank). With ``k = 0`` (no usable surrogate) ``u = z``.
        """
        if self.k == 0:
            yield from isotropic()
            return
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(self.k, generator=gen, dtype=torch.float64)
        b = self._coef @ a * math.sqrt((1.0 - self.alpha) * self._d / self.k)  # u_sub = S b
        coef = [float(x) for x in b]
        iso = isotropic() if self.alpha > 0 else None
        for j, p in enumerate(params):
            z = next(iso) if iso is not None else None
            u = z.mul_(math.sqrt(self.alpha)) if z is not None else torch.zeros_like(p)
            for s, c in zip(self._surrogates, coef, strict=True):
                if s[j] is not None and c != 0.0:
                    u.add_(s[j].to(p.dtype), alpha=c)
            m = self._masks.get(p)
            yield u if m is None else u.mul_(m)
