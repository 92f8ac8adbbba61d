"""The run config: one typed, validated object per run, loaded from YAML plus overrides.

A run config is data (``configs/*.yaml``)::

    name: digits-zosam
    seed: 0
    epochs: 5
    data: {name: digits, batch_size: 64}
    model: {name: tiny_cnn}
    optimizer: {name: zosam, base: sgd, lr: 0.05, momentum: 0.9, rho: 0.05, mu: 1e-3, q: 1}
    sparse: {method: rigl, density: 0.1, update_interval: 20}

Every section rejects unknown keys and every value is checked before any data is loaded,
with errors that name the dotted field (``optimizer.rho=0 is invalid; ...``).
Optimizer hyperparameters are the keyword arguments of the chosen optimizer class and of
its base optimizer, so the peers' own hyperparameters need no extra config code.

This module holds the typed sections; reading YAML and applying overrides is
``zosam.yaml_io`` and building the optimizer ``zosam.optimizer_factory`` (both re-exported
where callers import them from here: ``load_config``, ``apply_overrides``, ``parse_value``,
``read_yaml_file``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zosam.data import DataConfig
from zosam.optim.checks import COMPILE_MODES
from zosam.optimizer_factory import build_optimizer, optimizer_hyper
from zosam.sparse import SparsityConfig
from zosam.validate import (
    ConfigError,
    check_experiment_name,
    check_tracking_uri_format,
    choice,
    in_range,
    prefixed,
    safe_name,
    section,
    show,
)
from zosam.yaml_io import apply_overrides, parse_value, read_yaml_file, yaml_load

__all__ = [
    "SEED_MAX",
    "CheckpointConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrackingConfig",
    "apply_overrides",
    "load_config",
    "parse_value",
    "read_yaml_file",
    "yaml_load",
]

_AMP = ("off", "bf16", "fp16")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_DEVICES = ("auto", "cpu", "cuda")
SEED_MAX = 2**32 - 1  # what every RNG the run seeds (torch, numpy, Optuna) accepts


@dataclass
class ModelConfig:
    """``name`` from ``zosam.models.MODELS``; other keys are the constructor's kwargs."""

    name: str = "resnet32"
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        from zosam.models import MODELS

        d = dict(d)
        name = d.pop("name", cls.name)
        prefixed("model", choice, "name", name, MODELS.names())
        params = inspect.signature(MODELS.get(name)).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            section("model", d, set(params) - {"num_classes"})
        # Values are checked by the constructor itself; on the meta device it allocates
        # nothing, so a bad width fails here, before any data is loaded.
        with torch.device("meta"):
            prefixed("model", MODELS.get(name), num_classes=10, **d)
        return cls(name, d)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.kwargs}


@dataclass
class OptimizerConfig:
    """The optimizer (``OPTIMIZERS``), its base (``BASE_OPTIMIZERS``) and all hyperparameters.

    ``hyper`` holds the keyword arguments of both classes (``lr``, ``momentum``, ``rho``,
    ``mu``, ``q``, ...). They are validated by building the optimizer on a dummy tensor.
    ``compile``: ``none`` (eager) or ``graphs`` (ZO-SAM's query passes replayed from CUDA
    graphs; ignored on the CPU, see ``zosam.optim.graphs``).
    """

    name: str = "base"
    base: str = "sgd"
    max_grad_norm: float | None = None
    hyper: dict[str, Any] = field(default_factory=lambda: {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4})
    # No weight decay on norms, biases and the model's no_weight_decay() names (pos_embed,
    # cls_token): timm's create_optimizer(filter_bias_and_bn=True), as DeiT trains.
    filter_bias_and_bn: bool = False
    compile: str = "none"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimizerConfig:
        d = dict(d)
        name, base = d.pop("name", cls.name), d.pop("base", cls.base)
        max_grad_norm = d.pop("max_grad_norm", None)
        filter_bias_and_bn = d.pop("filter_bias_and_bn", False)
        if not isinstance(filter_bias_and_bn, bool):
            raise ConfigError(f"optimizer.filter_bias_and_bn={show(filter_bias_and_bn)} is invalid; "
                              "allowed: true, false")
        compile_mode = d.pop("compile", "none")
        choice("optimizer.compile", compile_mode, COMPILE_MODES)
        cfg = cls(name, base, max_grad_norm, optimizer_hyper(name, base, d), filter_bias_and_bn=filter_bias_and_bn,
                  compile=compile_mode)
        cfg.build(torch.nn.Linear(1, 1), model=None)  # validates every value, cheaply
        return cfg

    def build(self, params_from: torch.nn.Module, *, model: torch.nn.Module | None,
              default_seed: int | None = None):
        """The optimizer over ``params_from``'s parameters (:func:`zosam.optimizer_factory.build_optimizer`)."""
        return build_optimizer(self.name, self.base, self.hyper, self.max_grad_norm, params_from, model=model,
                               default_seed=default_seed, filter_bias_and_bn=self.filter_bias_and_bn,
                               compile=self.compile)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "base": self.base, **self.hyper}
        if self.max_grad_norm is not None:
            out["max_grad_norm"] = self.max_grad_norm
        if self.filter_bias_and_bn:
            out["filter_bias_and_bn"] = True
        if self.compile != "none":
            out["compile"] = self.compile
        return out


@dataclass
class ScheduleConfig:
    """Learning rate: linear warm-up for ``warmup_epochs``, then cosine decay to ``min_lr``."""

    warmup_epochs: float = 0.0
    min_lr: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScheduleConfig:
        c = cls(**d)
        in_range("warmup_epochs", c.warmup_epochs, 0)
        in_range("min_lr", c.min_lr, 0)
        return c

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CheckpointConfig:
    """``dir``: where checkpoints go (default ``runs/<name>``); ``every``: epochs between them."""

    dir: str | None = None
    every: int = 1
    keep: int = 2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointConfig:
        c = cls(**d)
        if c.dir is not None and (not isinstance(c.dir, str) or not c.dir or "\0" in c.dir):
            raise ConfigError(f"dir={show(c.dir)} is invalid; must be a folder path (a string) or null")
        in_range("every", c.every, 1, integer=True)
        in_range("keep", c.keep, 1, integer=True)
        return c

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalConfig:
    """Evaluation: test set every ``every`` epochs (and always after the last one).

    ``corruptions``: a CIFAR-10-C directory (official or generated) evaluated at the end;
    ``corruption_subset``: images per corruption and severity (``None``: all);
    ``diagnostics_steps``: for the first N steps, the cosine between ZO-SAM's estimate and
    the true gradient and the sharpness gap L(w + e) - L(w) (extra passes, not counted).
    """

    every: int = 1
    corruptions: str | None = None
    corruption_subset: int | None = None
    diagnostics_steps: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        c = cls(**d)
        in_range("every", c.every, 1, integer=True)
        in_range("diagnostics_steps", c.diagnostics_steps, 0, integer=True)
        if c.corruption_subset is not None:
            in_range("corruption_subset", c.corruption_subset, 1, integer=True)
        if c.corruptions is not None and (not isinstance(c.corruptions, str) or not c.corruptions):
            raise ConfigError(f"corruptions={show(c.corruptions)} is invalid; must be a folder path or null")
        return c

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrackingConfig:
    """MLflow: ``uri`` (default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``);
    ``log_model``: log the final model as an MLflow LoggedModel (costs its size on disk);
    ``system_metrics``: sample CPU/memory/GPU into ``system/*`` metrics while the run trains,
    every 10 s (``true``), every that many seconds (a number) or not at all (``false``)."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "zosam"
    log_model: bool = True
    system_metrics: bool | float = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrackingConfig:
        c = cls(**d)
        for flag in ("enabled", "log_model"):
            choice(flag, getattr(c, flag), (True, False))
        if not isinstance(c.system_metrics, bool):
            in_range("system_metrics (true, false or a sampling interval in seconds)", c.system_metrics, 0.5, 3600)
        if c.uri is not None:
            check_tracking_uri_format("uri", c.uri)
        check_experiment_name("experiment", c.experiment)
        return c

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {
    "data": DataConfig, "model": ModelConfig, "optimizer": OptimizerConfig, "sparse": SparsityConfig,
    "schedule": ScheduleConfig, "checkpoint": CheckpointConfig, "eval": EvalConfig, "tracking": TrackingConfig,
}


@dataclass
class RunConfig:
    """One training run. See the module docstring for the YAML layout."""

    name: str = "run"
    seed: int = 0
    epochs: int = 10
    device: str = "auto"
    amp: str = "off"
    dtype: str = "float32"
    label_smoothing: float = 0.0
    # Mixup/CutMix (timm's Mixup, DeiT's flags): Beta alphas (0: off), the chance a batch is
    # mixed, the chance it is CutMix when both are on, and per batch/pair/element draws.
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    model_ema_decay: float | None = None  # EMA of the weights, evaluated and checkpointed (DeiT: 0.99996)
    max_steps_per_epoch: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sparse: SparsityConfig = field(default_factory=SparsityConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = copy.deepcopy(dict(d))
        top = {f.name for f in dataclasses.fields(cls)}
        section("", d, top)
        for key, value in d.items():
            if key in _SECTIONS and value is not None and not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        sections = {k: _section(k, d.pop(k, None)) for k in _SECTIONS}
        cfg = cls(**d, **sections)
        in_range("seed", cfg.seed, 0, SEED_MAX, integer=True)
        in_range("epochs", cfg.epochs, 1, integer=True)
        choice("device", cfg.device, _DEVICES)
        choice("amp", cfg.amp, _AMP)
        choice("dtype", cfg.dtype, tuple(_DTYPES))
        if cfg.dtype != "float32" and cfg.amp != "off":
            raise ConfigError(f"amp={cfg.amp!r} is invalid with dtype={cfg.dtype!r}; "
                             "mixed precision needs dtype=float32")
        in_range("label_smoothing", cfg.label_smoothing, 0, 1, high_open=True)
        _check_recipe(cfg)
        if cfg.max_steps_per_epoch is not None:
            in_range("max_steps_per_epoch", cfg.max_steps_per_epoch, 1, integer=True)
        safe_name("name", cfg.name)
        _check_maskable(cfg)
        return cfg

    @property
    def torch_dtype(self) -> torch.dtype:
        """The floating dtype of weights and inputs: float64 makes runs that differ only
        in reduction order (ranks, threads, CPUs) agree to rounding, about 1e-15."""
        return _DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if hasattr(v, "to_dict") else v
        return out


def _check_recipe(cfg: RunConfig) -> None:
    """Mixup/CutMix and model EMA fields (see ``zosam.recipe``)."""
    from zosam.recipe import MIXUP_MODES

    in_range("mixup", cfg.mixup, 0)
    in_range("cutmix", cfg.cutmix, 0)
    in_range("mixup_prob", cfg.mixup_prob, 0, 1)
    in_range("mixup_switch_prob", cfg.mixup_switch_prob, 0, 1)
    choice("mixup_mode", cfg.mixup_mode, MIXUP_MODES)
    if (cfg.mixup or cfg.cutmix) and cfg.data.batch_size % 2:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is invalid with mixup/cutmix (timm mixes sample i "
                          "with sample B-1-i); allowed: an even number")
    if cfg.model_ema_decay is not None:
        in_range("model_ema_decay", cfg.model_ema_decay, 0, 1, low_open=True, high_open=True)


def _check_maskable(cfg: RunConfig) -> None:
    """A sparse host needs prunable layers: checked on the meta device, before any data."""
    if cfg.sparse.is_dense:
        return
    from zosam.models import MODELS
    from zosam.sparse import maskable_parameters

    with torch.device("meta"):
        model = MODELS.get(cfg.model.name)(num_classes=10, **cfg.model.kwargs)
    if not maskable_parameters(model, dense_first_layer=cfg.sparse.dense_first_layer,
                               dense_classifier=cfg.sparse.dense_classifier):
        raise ConfigError(f"sparse.method={cfg.sparse.method!r} is invalid for model {cfg.model.name!r}: it has no "
                         "prunable conv/linear layer besides the first layer and the classifier; use a deeper "
                         "model, sparse.dense_first_layer=false or sparse.dense_classifier=false, or "
                         "sparse.method=dense")


def _section(name: str, d: dict[str, Any] | None):
    """Build one section; plain dataclass sections reject keys that are not their fields."""
    cls, d = _SECTIONS[name], dict(d or {})
    if cls not in (ModelConfig, OptimizerConfig):  # these two check against constructor signatures
        section(name, d, {f.name for f in dataclasses.fields(cls)})
    return prefixed(name, cls.from_dict, d)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or start from the defaults) and apply overrides.

    Raises:
        ConfigError: naming the field (or the file and line); nothing is created or loaded.
    """
    d: dict[str, Any] = {}
    if path is not None:
        d = read_yaml_file(path, "config file")
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: a run config must be a mapping")
    return RunConfig.from_dict(apply_overrides(d, overrides or []))
