"""Boundary checks with one error format: the field, the bad value, and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def choice(field: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise ``ValueError`` naming both."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is invalid; allowed: {', '.join(map(repr, allowed))}")
    return value


def in_range(
    field: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> Any:
    """Check ``low <(=) value <(=) high`` (open or closed ends) and finiteness.

    The message states the interval in mathematical notation, e.g. ``must be in (0, 1]``.
    """
    lo_s = "-inf" if low is None else f"{low:g}"
    hi_s = "inf" if high is None else f"{high:g}"
    interval = f"{'(' if low_open or low is None else '['}{lo_s}, {hi_s}{')' if high_open or high is None else ']'}"
    kind = "an integer" if integer else "a number"
    bad = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
    if not bad and not math.isfinite(value):
        bad = True
    if not bad:
        if low is not None and (value < low or (low_open and value == low)):
            bad = True
        if high is not None and (value > high or (high_open and value == high)):
            bad = True
    if bad:
        raise ValueError(f"{field}={value!r} is invalid; must be {kind} in {interval}")
    return value
