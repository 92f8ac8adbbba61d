"""The dataset registry and what a registered loader returns: a ``DataBundle`` of two splits.

Nothing here depends on ``DataConfig``: the config checks names against ``DATASETS``, and
``zosam.data.load`` puts config and registry together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from zosam.registry import Registry

#: name -> loader; a loader takes the run's ``DataConfig`` and returns the full splits.
DATASETS: Registry[Callable[[Any], DataBundle]] = Registry("dataset")


@dataclass
class TensorSplit:
    """An in-memory split: ``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,)."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 NCHW, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels shape {tuple(self.labels.shape)} does not match "
                             f"{self.images.shape[0]} images")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DataBundle:
    """What ``load_dataset`` returns.

    Attributes:
        name: registry name (``cifar10-jpeg``).
        label: what results must be labelled with (``"CIFAR-10 (JPEG copy)"``).
        train, test: ``TensorSplit`` for in-memory sets, a ``torch.utils.data.Dataset``
            yielding ``(float CHW tensor, int)`` otherwise (``imagenet``).
        num_classes, input_shape: model construction (``input_shape`` is (C, H, W)).
        mean, std: per-channel normalisation in [0, 1] pixel units.
        hflip: horizontal flips are a valid augmentation (not for digits).
        classes: class names in label order.
        meta: provenance (archive hash, subset sizes, ...), logged with the run.
    """

    name: str
    label: str
    train: Any
    test: Any
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = True
    classes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def in_memory(self) -> bool:
        """True when both splits are ``TensorSplit`` (batched by ``BatchLoader``)."""
        return isinstance(self.train, TensorSplit) and isinstance(self.test, TensorSplit)
