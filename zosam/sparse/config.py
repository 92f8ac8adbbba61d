"""The sparsity schedule as data: one typed, validated config object.

Conventions (project-wide): ``density`` is the kept fraction of the *maskable* weights
(conv and linear weights that are not kept dense), ``sparsity = 1 - density``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zosam.sparse.methods import DENSE, DST_RULES, all_methods
from zosam.validate import ConfigError, choice, in_range, section

DISTRIBUTIONS = ("uniform", "erk", "er")
DROP_SCHEDULES = ("cosine", "constant", "linear")


@dataclass(frozen=True)
class SparsityConfig:
    """Which host, at which density, with which schedule.

    Attributes:
        method: the host: ``dense`` (no masks), pruning at init (``random``, ``magnitude``,
            ``snip``, ``grasp``, ``synflow``) or dynamic sparse training (``set``,
            ``rigl``, ``dsr``, ``mest``).
        distribution: layer densities, ``erk``, ``er`` or ``uniform``; used by every
            method except a pruner with ``global_threshold`` and DSR's reallocation.
        density: kept fraction of the maskable weights, in (0, 1].
        power_scale: ERK/ER exponent on the per-layer raw density, > 0.
        update_interval: optimizer steps between two mask updates of a dynamic host, >= 1.
        drop_fraction: fraction of a layer's active weights dropped (and regrown) at the
            first update, in [0, 1) (MEST: the initial mutation ratio).
        drop_schedule: decay of the drop fraction over training: ``cosine`` and
            ``linear`` reach zero at ``end_fraction``; ``constant`` stays put until then.
        end_fraction: no mask updates at or after ``end_fraction * total_steps``, in (0, 1].
        dense_first_layer: keep the first conv/linear layer dense.
        dense_classifier: keep the last linear layer (the classifier) dense.
        global_threshold: pruning at init keeps the global top-k scores instead of the
            top-k of each layer at the distribution's layer densities.
        prune_batches: batches consumed by SNIP (scores summed over them), >= 1.
        synflow_iterations: SynFlow pruning rounds (exponential schedule), >= 1.
        grasp_samples_per_class: size per class of GraSP's class-balanced batch, >= 1.
        grasp_temperature: GraSP divides logits by this temperature (the original uses
            200, which keeps the softmax away from saturation), > 0.
        mest_gradient_weight: MEST's drop score is ``|w| + mest_gradient_weight * |g|``,
            >= 0 (**Decision**: 1.0; the paper's coefficient is not recovered).
    """

    method: str = "dense"
    distribution: str = "erk"
    density: float = 0.1
    power_scale: float = 1.0
    update_interval: int = 100
    drop_fraction: float = 0.3
    drop_schedule: str = "cosine"
    end_fraction: float = 0.75
    dense_first_layer: bool = True
    dense_classifier: bool = True
    global_threshold: bool = False
    prune_batches: int = 1
    synflow_iterations: int = 100
    grasp_samples_per_class: int = 10
    grasp_temperature: float = 200.0
    mest_gradient_weight: float = 1.0

    def __post_init__(self) -> None:
        _validate(self)

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SparsityConfig:
        """Build from a plain mapping (a YAML ``sparse:`` section); unknown keys raise.

        Raises:
            ConfigError: an unknown key, or any field out of its domain (the message names
                the field as ``sparse.<field>``).
        """
        return cls(**section("sparse", d, (f.name for f in dataclasses.fields(cls))))

    def to_dict(self) -> dict[str, Any]:
        """Plain-python form (for checkpoints, MLflow params and sweeps)."""
        return dataclasses.asdict(self)

    # -- derived ---------------------------------------------------------------------
    @property
    def sparsity(self) -> float:
        """``1 - density`` (``0`` for ``dense``)."""
        return 0.0 if self.method == DENSE else 1.0 - self.density

    @property
    def is_dense(self) -> bool:
        return self.method == DENSE

    @property
    def is_dynamic(self) -> bool:
        return self.method in DST_RULES


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"sparse.{name}={value!r} is invalid; must be true or false")


def _validate(c: SparsityConfig) -> None:
    """Check every field; each error names the field as ``sparse.<field>``."""
    choice("sparse.method", c.method, all_methods())
    choice("sparse.distribution", c.distribution, DISTRIBUTIONS)
    in_range("sparse.density", c.density, 0, 1, low_open=True)
    in_range("sparse.power_scale", c.power_scale, 0, low_open=True)
    in_range("sparse.update_interval", c.update_interval, 1, integer=True)
    in_range("sparse.drop_fraction", c.drop_fraction, 0, 1, high_open=True)
    choice("sparse.drop_schedule", c.drop_schedule, DROP_SCHEDULES)
    in_range("sparse.end_fraction", c.end_fraction, 0, 1, low_open=True)
    for name in ("dense_first_layer", "dense_classifier", "global_threshold"):
        _check_bool(name, getattr(c, name))
    in_range("sparse.prune_batches", c.prune_batches, 1, integer=True)
    in_range("sparse.synflow_iterations", c.synflow_iterations, 1, integer=True)
    in_range("sparse.grasp_samples_per_class", c.grasp_samples_per_class, 1, integer=True)
    in_range("sparse.grasp_temperature", c.grasp_temperature, 0, low_open=True)
    in_range("sparse.mest_gradient_weight", c.mest_gradient_weight, 0)
