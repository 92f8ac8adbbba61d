"""Pareto fronts: the non-dominated points of a multi-objective result (sweeps, comparisons)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def pareto_front(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (``modes``: ``max``/``min`` per objective).

    ``a`` dominates ``b`` when it is at least as good on every objective and strictly
    better on one. Points with a non-finite value are never on the front.
    """
    sign = [1.0 if m == "max" else -1.0 for m in modes]
    pts = [[s * v for s, v in zip(sign, p, strict=True)] for p in points]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))

    finite = [i for i, p in enumerate(pts) if all(math.isfinite(v) for v in p)]
    return [i for i in finite if not any(dominates(pts[j], pts[i]) for j in finite if j != i)]
