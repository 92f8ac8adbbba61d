"""Layer-density distributions: how a global density is shared among maskable layers.

``uniform`` gives every layer the global density. ``er`` (Erdős–Rényi, Mocanu et al.
2018) and ``erk`` (ER-Kernel, Evci et al. 2020) make a layer's density proportional to a
raw score ``s_l``::

    er : s_l = ((n_out + n_in) / (n_out * n_in)) ** power_scale         (kernel ignored)
    erk: s_l = (sum(shape) / prod(shape)) ** power_scale                (e.g. conv: o+i+kh+kw)
    d_l = eps * s_l,  with eps chosen so that  sum_l d_l * n_l = density * N.

A layer whose ``eps * s_l`` exceeds 1 is set dense (d_l = 1) and ``eps`` is solved again
on the remaining layers, until no layer exceeds 1. ``eps`` only grows when a layer is
capped (the capped layer needed fewer weights than its share), so capping one layer at a
time (the largest) converges in at most ``len(shapes)`` rounds.

:func:`layer_counts` turns the real-valued densities into integer weight counts whose
sum is exactly ``round(density * N)``: the realised global density equals the target to
the nearest weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from zosam.sparse.config import DISTRIBUTIONS
from zosam.validate import choice, in_range

Shape = Sequence[int]


def _numel(shape: Shape) -> int:
    return math.prod(int(s) for s in shape)


def raw_score(shape: Shape, distribution: str, power_scale: float = 1.0) -> float:
    """The unnormalised density ``s_l`` of one layer (see the module docstring)."""
    if distribution == "uniform":
        return 1.0
    dims = [int(s) for s in shape]
    if distribution == "er":
        dims = dims[:2]  # ER ignores the kernel: a conv counts as an (out, in) linear layer
    return (sum(dims) / math.prod(dims)) ** power_scale


def layer_densities(
    shapes: Mapping[str, Shape],
    density: float,
    distribution: str = "erk",
    power_scale: float = 1.0,
) -> dict[str, float]:
    """Per-layer densities of the maskable weights for a global ``density``.

    Args:
        shapes: ``{name: shape}`` of the maskable weights (every layer given is maskable).
        density: the global kept fraction, in (0, 1].
        distribution: ``uniform``, ``erk`` or ``er``.
        power_scale: exponent applied to the ER/ERK raw scores, > 0.

    Returns:
        ``{name: d_l}`` with ``0 < d_l <= 1`` and ``sum_l d_l n_l = density * N`` (up to
        floating point); the integer version is :func:`layer_counts`.
    """
    in_range("density", density, 0, 1, low_open=True)
    choice("distribution", distribution, DISTRIBUTIONS)
    in_range("power_scale", power_scale, 0, low_open=True)
    if not shapes:
        return {}
    numel = {name: _numel(s) for name, s in shapes.items()}
    score = {name: raw_score(s, distribution, power_scale) for name, s in shapes.items()}
    budget = density * sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        remaining = budget - sum(numel[n] for n in dense)
        eps = remaining / sum(score[n] * numel[n] for n in free)
        worst = max(free, key=lambda n: score[n])
        # Cap the layer with the largest raw score if it would exceed density 1; the
        # relative tolerance stops float noise at density=1 from looping.
        if eps * score[worst] > 1.0 + 1e-12 and len(free) > 1:
            dense.add(worst)
            continue
        return {n: 1.0 if n in dense else min(1.0, eps * score[n]) for n in shapes}


def target_count(total: int, density: float) -> int:
    """``round(density * total)`` with halves rounded up, and at least one weight."""
    return max(1, min(total, math.floor(density * total + 0.5)))


def layer_counts(
    shapes: Mapping[str, Shape],
    density: float,
    distribution: str = "erk",
    power_scale: float = 1.0,
) -> dict[str, int]:
    """Integer kept-weight counts per layer; their sum is exactly ``target_count(N, density)``.

    Each layer gets ``floor(d_l n_l)`` and the remaining weights go, one each, to the
    layers with the largest fractional parts (ties: the earlier layer), never above
    ``n_l``. Every layer keeps at least one weight when the budget allows it, so no
    layer is disconnected by rounding.
    """
    dens = layer_densities(shapes, density, distribution, power_scale)
    numel = {n: _numel(s) for n, s in shapes.items()}
    total = target_count(sum(numel.values()), density)
    exact = {n: dens[n] * numel[n] for n in shapes}
    floor_ = {n: min(numel[n], math.floor(exact[n])) for n in shapes}
    if total >= len(shapes):
        floor_ = {n: max(1, c) for n, c in floor_.items()}
    counts = dict(floor_)
    order = sorted(shapes, key=lambda n: exact[n] - math.floor(exact[n]), reverse=True)
    diff = total - sum(counts.values())
    # Hand out (or take back, if the at-least-one rule overshot) one weight at a time.
    while diff != 0:
        step = 1 if diff > 0 else -1
        moved = False
        for n in order if step > 0 else reversed(order):
            if diff == 0:
                break
            if (step > 0 and counts[n] < numel[n]) or (step < 0 and counts[n] > 1):
                counts[n] += step
                diff -= step
                moved = True
        if not moved:
            break
    realised = sum(counts.values())
    assert realised == total, f"layer counts sum to {realised}, target {total}"
    return counts
