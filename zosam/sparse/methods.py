"""The two method registries of sparse training; every list of allowed host names comes from them.

``PRUNERS`` (pruning at init, filled by ``zosam.sparse.pruners``) and ``DST_RULES`` (dynamic
sparse training, filled by ``zosam.sparse.dst``). They live apart from their members so that
``SparsityConfig`` can check a name against them without importing the methods (which take
the config as input).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zosam.registry import Registry

#: name -> ``pruner(PruneContext) -> {layer: bool mask}``.
PRUNERS: Registry[Callable[..., Any]] = Registry("pruner")
#: name -> ``rule(UpdateContext) -> ({layer: bool mask}, positions changed)``.
DST_RULES: Registry[Callable[..., Any]] = Registry("DST rule")

#: Training without masks; not a registered method.
DENSE = "dense"


def static_methods() -> tuple[str, ...]:
    """Every pruning-at-init host, in registry order (sorted)."""
    return tuple(PRUNERS.names())


def dynamic_methods() -> tuple[str, ...]:
    """Every dynamic sparse training host, in registry order (sorted)."""
    return tuple(DST_RULES.names())


def all_methods() -> tuple[str, ...]:
    """``dense``, then the static hosts, then the dynamic ones."""
    return (DENSE, *static_methods(), *dynamic_methods())
