"""Statistics over seeds: mean, sample standard deviation and the 95 % Student-t interval.

One implementation for ``zosam compare`` and every benchmark, so a table's ``± std`` means
the same everywhere: the sample standard deviation (n - 1 in the denominator), absent
below two seeds. Nothing here imports from ``zosam``: every layer may use it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SeedStats:
    """Summary of one quantity over seeds."""

    n: int
    mean: float  #: NaN without values
    std: float | None  #: sample standard deviation (ddof 1); None below two values
    ci95: float | None  #: half-width of the two-sided 95 % Student-t interval of the mean; None below two


def interval95(values: Sequence[float]) -> float | None:
    """Half-width of the two-sided 95 % Student-t interval of the mean (``None`` below two values)."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    return float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def seed_stats(values: Iterable[float]) -> SeedStats:
    """Mean, sample std and 95 % interval of ``values``."""
    xs = list(values)
    if not xs:
        return SeedStats(0, math.nan, None, None)
    std = statistics.stdev(xs) if len(xs) > 1 else None
    return SeedStats(len(xs), statistics.fmean(xs), std, interval95(xs))


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the sample standard deviation (ddof = 1; ``None`` for a single value)."""
    s = seed_stats(values)
    return s.mean, s.std


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """Mean of the finite values, ``None`` when there are none (a measure some runs lack)."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(xs) if xs else None
