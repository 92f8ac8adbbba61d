"""The constructor checks every optimizer in ``zosam.optim`` shares: one helper,
``check_args(name=(value, rule))``, and the allowed ``compile`` modes."""

from __future__ import annotations

from typing import Any

from zosam.validate import choice, in_range

COMPILE_MODES = ("none", "graphs")
"""``compile``: eager passes, or the no-grad query passes replayed from CUDA graphs
(:mod:`zosam.optim.graphs`; ignored on the CPU)."""

_RULES: dict[str, dict[str, Any]] = {
    "positive": {"low": 0, "low_open": True},       # (0, inf)
    "nonnegative": {"low": 0},                      # [0, inf)
    "fraction": {"low": 0, "high": 1, "low_open": True},  # (0, 1]
    "unit": {"low": 0, "high": 1},                  # [0, 1]
    "count": {"low": 1, "integer": True},           # 1, 2, ...
    "seed": {"low": 0, "integer": True},            # 0, 1, ...
}


def check_args(**args: tuple[Any, str | tuple[str, ...]]) -> None:
    """The one constructor check of every optimizer: ``name=(value, rule)``.

    ``rule`` is one of ``positive``, ``nonnegative``, ``fraction`` ((0, 1]), ``unit``
    ([0, 1]), ``count`` (integer >= 1), ``seed`` (integer >= 0), ``bool``, or a tuple of
    allowed strings. Raises ``ValueError`` naming the field and what is allowed.
    """
    for name, (value, rule) in args.items():
        if isinstance(rule, tuple):
            choice(name, value, rule)
        elif rule == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} is invalid; allowed: True, False")
        else:
            in_range(name, value, **_RULES[rule])
