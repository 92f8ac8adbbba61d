"""The optimizer of a run config: which keys its section allows, their defaults, and the build.

The allowed hyperparameters are the keyword arguments of the chosen optimizer class and of
its base optimizer, so a new optimizer needs no config code. The name ``base`` is the base
optimizer alone (one forward, one backward, one base step: SGD with momentum, AdamW, ...);
``sgd``, its old name, is still accepted with a ``FutureWarning``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from zosam.optim import BASE_OPTIMIZERS, OPTIMIZERS
from zosam.recipe import weight_decay_groups
from zosam.validate import choice, in_range, prefixed, section

#: Arguments of the wrapper classes that are not hyperparameters of a config.
WRAPPER_ARGS = {"self", "params", "base_optimizer", "model", "max_grad_norm", "compile", "base_kwargs", "kwargs"}


def optimizer_hyper(name: str, base: str, d: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters of optimizer ``name`` on base ``base`` from section ``d`` (without
    ``name``, ``base``, ``max_grad_norm``), defaults filled in, common ones range-checked.

    Raises:
        ConfigError: an unknown name, base or key, or a value out of range (``optimizer.<field>``).
    """
    checked = OPTIMIZERS.resolve(name, "optimizer.name")
    prefixed("optimizer", choice, "name", checked, OPTIMIZERS.names())
    prefixed("optimizer", choice, "base", base, BASE_OPTIMIZERS.names())
    own = set(inspect.signature(OPTIMIZERS.get(checked)).parameters) - WRAPPER_ARGS
    base_args = set(inspect.signature(BASE_OPTIMIZERS.get(base)).parameters) - {"self", "params"}
    section("optimizer", d, own | base_args | {"name", "base", "max_grad_norm"})
    hyper = {"lr": 0.1, **({"momentum": 0.9} if base == "sgd" else {}), "weight_decay": 5e-4, **d}
    # The base optimizers' own checks raise torch's messages (or a TypeError for a
    # string); the common hyperparameters get the project's format here. lr = 0 would
    # train nothing and divide by zero in the schedule.
    in_range("optimizer.lr", hyper["lr"], 0, low_open=True)
    in_range("optimizer.weight_decay", hyper["weight_decay"], 0)
    if "momentum" in hyper:
        in_range("optimizer.momentum", hyper["momentum"], 0, 1, high_open=True)
    return hyper


def build_optimizer(name: str, base: str, hyper: Mapping[str, Any], max_grad_norm: float | None,
                    params_from: torch.nn.Module, *, model: torch.nn.Module | None,
                    default_seed: int | None = None, filter_bias_and_bn: bool = False,
                    compile: str = "none"):
    """Optimizer ``name`` over ``params_from``'s parameters; ``model`` freezes its BatchNorm.

    ``filter_bias_and_bn`` puts norms, biases and the model's ``no_weight_decay()`` names in
    a group without weight decay (timm's rule, as DeiT trains); ``compile`` is the
    optimizer's pass mode (``none`` or ``graphs``, see ``zosam.optim.checks.COMPILE_MODES``).

    Optimizers with a ``seed`` argument (ZO-SAM's directions, ...) get ``default_seed``
    (the run's seed) unless ``hyper`` sets their own. Whatever the constructors reject is a
    ``ConfigError`` naming ``optimizer``.
    """
    cls = OPTIMIZERS.get(OPTIMIZERS.canonical(name))  # a deprecated name warned when the config was read
    hyper = dict(hyper)
    if default_seed is not None and "seed" in inspect.signature(cls).parameters:
        hyper.setdefault("seed", default_seed)
    params = weight_decay_groups(params_from, hyper["weight_decay"]) if filter_bias_and_bn else None
    return prefixed("optimizer", cls, params or params_from.parameters(), BASE_OPTIMIZERS.get(base),
                    model=model, max_grad_norm=max_grad_norm, compile=compile, **hyper)
