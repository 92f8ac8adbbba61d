"""Sparse training: masks, layer-density distributions, pruning at init and DST.

- :class:`SparsityConfig`: the sparsity schedule as one validated, typed object.
- :class:`Masking`: owns a model's masks (init, optimizer hookup, updates, checkpoints,
  reports).
- :func:`layer_densities` / :func:`layer_counts`: uniform, ER and ERK layer densities and
  their exact integer counts.
- :func:`count_flops`: multiply-adds per sample over active conv/linear weights.
- ``PRUNERS``: the pruning-at-init registry (random, magnitude, snip, grasp, synflow);
  ``DST_RULES``: the dynamic sparse training registry (set, rigl, dsr, mest). Every list of
  host names (``METHODS`` ...) is read from these two.

Convention: ``density`` = kept fraction of the maskable weights, ``sparsity = 1 - density``.
"""

from zosam.sparse.config import DISTRIBUTIONS, DROP_SCHEDULES, SparsityConfig
from zosam.sparse.distributions import layer_counts, layer_densities
from zosam.sparse.dst import drop_fraction_at, is_update_step
from zosam.sparse.flops import count_flops
from zosam.sparse.masking import Masking
from zosam.sparse.masks import apply_masks, maskable_parameters
from zosam.sparse.methods import DST_RULES, PRUNERS, all_methods, dynamic_methods, static_methods

# The registries are complete once masking (pruners, dst) is imported above.
STATIC_METHODS = static_methods()
DYNAMIC_METHODS = dynamic_methods()
METHODS = all_methods()

__all__ = [
    "DISTRIBUTIONS",
    "DROP_SCHEDULES",
    "DST_RULES",
    "DYNAMIC_METHODS",
    "METHODS",
    "PRUNERS",
    "STATIC_METHODS",
    "Masking",
    "SparsityConfig",
    "apply_masks",
    "count_flops",
    "drop_fraction_at",
    "is_update_step",
    "layer_counts",
    "layer_densities",
    "maskable_parameters",
]
