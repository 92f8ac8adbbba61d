"""Optimizers: the plain first-order step, SAM, ZO-SAM and the efficient-SAM peers
(ESAM, LookSAM, GSAM, RWP).

All share one API (:class:`PerturbationOptimizer`): ``step(closure, *, scaler=None)``,
``set_masks``, ``pass_counts``, ``state_dict``. ``OPTIMIZERS`` maps the names used in run
configs to the classes; ``BASE_OPTIMIZERS`` maps base-optimizer names to torch classes.
"""

from __future__ import annotations

import torch

from zosam.optim.base import PerturbationOptimizer, apply_masks, make_closure, wide
from zosam.optim.peers import ESAM, GSAM, RWP, LookSAM
from zosam.optim.sam import SAM, FirstOrder
from zosam.optim.zosam import ZOSAM, derive_seed
from zosam.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")
OPTIMIZERS.register("sgd")(FirstOrder)
OPTIMIZERS.register("sam")(SAM)
OPTIMIZERS.register("zosam")(ZOSAM)
OPTIMIZERS.register("esam")(ESAM)
OPTIMIZERS.register("looksam")(LookSAM)
OPTIMIZERS.register("gsam")(GSAM)
OPTIMIZERS.register("rwp")(RWP)

BASE_OPTIMIZERS: Registry = Registry("base optimizer")
BASE_OPTIMIZERS.register("sgd")(torch.optim.SGD)
BASE_OPTIMIZERS.register("adamw")(torch.optim.AdamW)

__all__ = [
    "BASE_OPTIMIZERS",
    "ESAM",
    "GSAM",
    "OPTIMIZERS",
    "RWP",
    "SAM",
    "ZOSAM",
    "FirstOrder",
    "LookSAM",
    "PerturbationOptimizer",
    "apply_masks",
    "derive_seed",
    "make_closure",
    "wide",
]
