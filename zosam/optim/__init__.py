"""Optimizers: the plain first-order step, SAM, ZO-SAM and the efficient-SAM peers
(ESAM, LookSAM, GSAM, RWP, AsyncSAM, MSAM).

All share one API (:class:`PerturbationOptimizer`): ``step(closure, *, scaler=None)``,
``set_masks`` (the ``zosam.sparse.masks.Maskable`` interface), ``params()``,
``frozen_batchnorm()``, ``pass_counts``, ``skipped_perturbations``, ``state_dict``; their
parameters live in flat buffers (:class:`FlatParams`) and their random directions come
from samplers (:mod:`zosam.optim.samplers`). ``OPTIMIZERS`` maps the names used in run
configs to the classes; ``BASE_OPTIMIZERS`` maps base-optimizer names to torch classes.
"""

from __future__ import annotations

import torch

from zosam.optim.base import PerturbationOptimizer
from zosam.optim.checks import check_args
from zosam.optim.closure import make_closure
from zosam.optim.esam import ESAM
from zosam.optim.flat import FlatParams, global_norm, wide
from zosam.optim.free_ascent import MSAM, AsyncSAM
from zosam.optim.gsam import GSAM
from zosam.optim.guided import GUIDES, GuidedDirections
from zosam.optim.looksam import LookSAM
from zosam.optim.rwp import RWP
from zosam.optim.sam import SAM, FirstOrder
from zosam.optim.samplers import Bernoulli, DirectionSampler, Gaussian, Sphere, derive_seed
from zosam.optim.zosam import ZOSAM
from zosam.registry import Registry
from zosam.sparse.masks import apply_masks

OPTIMIZERS: Registry = Registry("optimizer")
OPTIMIZERS.register("base")(FirstOrder)  # the base optimizer alone, whichever it is
OPTIMIZERS.deprecate("sgd", "base")
OPTIMIZERS.register("sam")(SAM)
OPTIMIZERS.register("zosam")(ZOSAM)
OPTIMIZERS.register("esam")(ESAM)
OPTIMIZERS.register("looksam")(LookSAM)
OPTIMIZERS.register("gsam")(GSAM)
OPTIMIZERS.register("rwp")(RWP)
OPTIMIZERS.register("asyncsam")(AsyncSAM)
OPTIMIZERS.register("msam")(MSAM)

BASE_OPTIMIZERS: Registry = Registry("base optimizer")
BASE_OPTIMIZERS.register("sgd")(torch.optim.SGD)
BASE_OPTIMIZERS.register("adamw")(torch.optim.AdamW)

__all__ = [
    "BASE_OPTIMIZERS",
    "ESAM",
    "GSAM",
    "GUIDES",
    "MSAM",
    "OPTIMIZERS",
    "RWP",
    "SAM",
    "ZOSAM",
    "AsyncSAM",
    "Bernoulli",
    "DirectionSampler",
    "FirstOrder",
    "FlatParams",
    "Gaussian",
    "GuidedDirections",
    "LookSAM",
    "PerturbationOptimizer",
    "Sphere",
    "apply_masks",
    "check_args",
    "derive_seed",
    "global_norm",
    "make_closure",
    "wide",
]
