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
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from zosam.data import DataConfig
from zosam.sparse import SparsityConfig
from zosam.validate import (
    ConfigError,
    check_experiment_name,
    check_tracking_uri_format,
    choice,
    in_range,
    safe_name,
    section,
    show,
)

_AMP = ("off", "bf16", "fp16")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_DEVICES = ("auto", "cpu", "cuda")
_WRAPPER_ARGS = {"self", "params", "base_optimizer", "model", "max_grad_norm", "base_kwargs", "kwargs"}
SEED_MAX = 2**32 - 1  # what every RNG the run seeds (torch, numpy, Optuna) accepts


_FIELD_MESSAGE = re.compile(r"^[A-Za-z_][\w.]*=")  # the zosam.validate format: ``field=value is invalid``


def _prefixed(prefix: str, fn, *args, **kwargs):
    """Run a validator and put ``prefix.`` in front of the field its error names.

    Messages in another format (torch's own checks, e.g. ``Invalid learning rate: -1``,
    or a ``TypeError`` from a value of the wrong type) become ``prefix: message``. Every
    one becomes a :class:`ConfigError`: ``fn`` only checks user values (constructors on
    the meta device or on a dummy tensor), so whatever it rejects is bad input.
    """
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError, RuntimeError, OverflowError, AttributeError, IndexError, KeyError) as e:
        msg = str(e)
        if msg.startswith((prefix + ".", prefix + ":", "unknown key")):
            raise ConfigError(msg) from None
        if _FIELD_MESSAGE.match(msg):
            raise ConfigError(f"{prefix}.{msg}") from None
        raise ConfigError(f"{prefix}: {msg or type(e).__name__}") from None


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
        _prefixed("model", choice, "name", name, MODELS.names())
        params = inspect.signature(MODELS.get(name)).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            section("model", d, set(params) - {"num_classes"})
        # Values are checked by the constructor itself; on the meta device it allocates
        # nothing, so a bad width fails here, before any data is loaded.
        with torch.device("meta"):
            _prefixed("model", MODELS.get(name), num_classes=10, **d)
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

    name: str = "sgd"
    base: str = "sgd"
    max_grad_norm: float | None = None
    hyper: dict[str, Any] = field(default_factory=lambda: {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4})
    compile: str = "none"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimizerConfig:
        from zosam.optim import BASE_OPTIMIZERS, OPTIMIZERS

        d = dict(d)
        name, base = d.pop("name", cls.name), d.pop("base", cls.base)
        max_grad_norm = d.pop("max_grad_norm", None)
        compile_mode = d.pop("compile", "none")
        _prefixed("optimizer", choice, "compile", compile_mode, ("none", "graphs"))
        _prefixed("optimizer", choice, "name", name, OPTIMIZERS.names())
        _prefixed("optimizer", choice, "base", base, BASE_OPTIMIZERS.names())
        own = set(inspect.signature(OPTIMIZERS.get(name)).parameters) - _WRAPPER_ARGS
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
        cfg = cls(name, base, max_grad_norm, hyper, compile_mode)
        cfg.build(torch.nn.Linear(1, 1), model=None)  # validates every value, cheaply
        return cfg

    def build(self, params_from: torch.nn.Module, *, model: torch.nn.Module | None,
              default_seed: int | None = None):
        """The optimizer over ``params_from``'s parameters; ``model`` freezes its BatchNorm.

        Optimizers with a ``seed`` argument (ZO-SAM's directions, ...) get ``default_seed``
        (the run's seed) unless the config sets their own.
        """
        from zosam.optim import BASE_OPTIMIZERS, OPTIMIZERS

        cls = OPTIMIZERS.get(self.name)
        hyper = dict(self.hyper)
        if default_seed is not None and "seed" in inspect.signature(cls).parameters:
            hyper.setdefault("seed", default_seed)
        return _prefixed("optimizer", cls, params_from.parameters(), BASE_OPTIMIZERS.get(self.base),
                         model=model, max_grad_norm=self.max_grad_norm, compile=self.compile, **hyper)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "base": self.base, **self.hyper}
        if self.max_grad_norm is not None:
            out["max_grad_norm"] = self.max_grad_norm
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
    """MLflow: ``uri`` (default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``)."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "zosam"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrackingConfig:
        c = cls(**d)
        choice("enabled", c.enabled, (True, False))
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
    return _prefixed(name, cls.from_dict, d)


class _Loader(yaml.SafeLoader):
    """YAML with exponent floats written without a dot (``1e-3``, ``5e-4``) read as numbers.

    Plain YAML 1.1 reads them as strings, so ``optimizer.mu=1e-3`` would be rejected as
    ``'1e-3'``; this resolver accepts what Python's ``float`` does for such literals.
    A key written twice in one mapping is an error (plain YAML keeps the last silently).
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:
                    continue  # unhashable: the base class reports it
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {show(key)} (first at line {first.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

MAX_VALUES = 100_000  # values in one YAML document, aliases expanded: a config has a few hundred
MAX_FILE_BYTES = 1 << 20


def yaml_load(text: str, where: str = "YAML") -> Any:
    """Parse YAML (safe: ``_Loader`` is a SafeLoader subclass); every problem is a ``ConfigError``
    naming ``where`` and the line. Documents that expand to more than ``MAX_VALUES`` values
    through aliases (an "alias bomb") are refused."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise ConfigError(f"{where}:{at}: invalid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from None
    _check_size(data, where)
    return data


def _check_size(data: Any, where: str) -> None:
    stack, count = [data], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(f"{where}: expands to more than {MAX_VALUES} values (nested YAML aliases?); "
                              "a config holds a few hundred")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def read_yaml_file(path: str | Path, what: str) -> Any:
    """Read a YAML file that a user named (``what``: ``config file``, ``sweep spec``, ...).

    Missing, a directory, too big, not UTF-8, not YAML, empty: each a one-line ``ConfigError``.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {str(p)!r} is a directory; give a YAML file")
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{what} {str(p)!r} is {size} bytes; a YAML config is far below {MAX_FILE_BYTES}")
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {str(p)!r} cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {str(p)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") \
            from None
    data = yaml_load(text, str(p))
    if data is None:
        raise ConfigError(f"{what} {str(p)!r} is empty (no YAML mapping in it)")
    return data


def parse_value(text: str) -> Any:
    """Command-line override values are YAML scalars: ``0.05``, ``1e-3``, ``true``, ``null``, ``[1, 2]``."""
    return yaml_load(text, f"value {show(text)}")


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (missing sections are created)."""
    d = copy.deepcopy(d)
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"override {show(item)} is invalid; expected key.path=value")
        key, eq, value = item.partition("=")
        if not eq or not key or "" in key.split("."):
            raise ConfigError(f"override {show(item)} is invalid; expected key.path=value")
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {show(item)}: {p} is not a section")
        try:
            node[leaf] = parse_value(value)
        except ConfigError as e:
            raise ConfigError(f"override {show(item)}: {e}") from None
    return d


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
