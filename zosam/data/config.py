"""``DataConfig``: the typed, validated data section of a run config."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zosam.data.registry import DATASETS
from zosam.validate import ConfigError, choice, in_range, section

# zosam/data/config.py -> parents[2] is the repository root; the shared folder sits beside it.
_REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CIFAR10_JPEG = _REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def default_archive() -> str:
    """The CIFAR-10 JPEG archive: ``$ZOSAM_CIFAR10_JPEG`` or ``<repo>/../shared/data/...``."""
    return os.environ.get("ZOSAM_CIFAR10_JPEG") or str(DEFAULT_CIFAR10_JPEG)


def default_cache_dir() -> str:
    """Where decoded arrays are cached: ``$ZOSAM_CACHE`` or ``~/.cache/zosam``."""
    return os.environ.get("ZOSAM_CACHE") or str(Path("~/.cache/zosam").expanduser())


IMAGENET_RECIPES = ("deit", "basic")


@dataclass
class DataConfig:
    """Which dataset to load and how to batch it.

    Attributes:
        name: a registered dataset (``zosam.data.DATASETS.names()``).
        data_dir: directory of the dataset's files (CIFAR pickles, ImageNet tree); unused by
            ``cifar10-jpeg`` (see ``archive``) and ``digits`` (bundled with scikit-learn).
        archive: path of the CIFAR-10 JPEG ``.tar.gz``.
        cache_dir: where decoded uint8 arrays are cached.
        train_subset, test_subset: keep a fixed class-balanced subset of this many images
            (``None``: all). The subset depends on ``subset_seed`` only, not the run seed,
            so runs with different seeds see the same images.
        subset_seed: seed of the subset draw.
        label_noise: fraction of training labels replaced by a different class, drawn
            uniformly among the other classes (symmetric noise), in [0, 1). Exactly
            ``round(label_noise * n)`` training samples are flipped, chosen after the
            subset; the test split is never touched.
        label_noise_seed: seed of the dedicated generator that picks the flipped samples
            and their new classes (independent of the run seed and the subset draw).
        augment: standard augmentation on the training split (CIFAR: crop + flip;
            ImageNet: the chosen recipe).
        image_size: side length for ``digits`` (upsampled from 8) and ``imagenet``.
        batch_size: training batch per worker (rank).
        eval_batch_size: evaluation batch per worker.
        num_workers: DataLoader worker processes (``imagenet`` only; in-memory sets need none).
        imagenet_recipe: ``"deit"`` (RandAugment rand-m9-mstd0.5-inc1, colour jitter 0.3,
            random erasing 0.25, bicubic) or ``"basic"`` (random-resized crop + flip).
        repeated_aug: copies of each training image per epoch, each augmented apart and
            sent to a different rank (DeiT's repeated augmentation: 3); 1 is off. For
            datasets read image by image (``imagenet``).
    """

    name: str = "cifar10-jpeg"
    data_dir: str | None = None
    archive: str = field(default_factory=default_archive)
    cache_dir: str = field(default_factory=default_cache_dir)
    train_subset: int | None = None
    test_subset: int | None = None
    subset_seed: int = 0
    label_noise: float = 0.0
    label_noise_seed: int = 0
    augment: bool = True
    image_size: int | None = None
    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 4
    imagenet_recipe: str = "deit"
    repeated_aug: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> DataConfig:
        """Check every field; errors name the field (``data.<field>``)."""
        # DATASETS is filled when the package is imported (zosam/data/__init__.py).
        choice("data.name", self.name, DATASETS.names())
        for f in ("data_dir",):
            v = getattr(self, f)
            if v is not None and not isinstance(v, str | os.PathLike):
                raise ConfigError(f"data.{f}={v!r} is invalid; must be a path or null")
        for f in ("archive", "cache_dir"):
            v = getattr(self, f)
            if not isinstance(v, str | os.PathLike):
                raise ConfigError(f"data.{f}={v!r} is invalid; must be a path")
        for f in ("train_subset", "test_subset", "image_size"):
            v = getattr(self, f)
            if v is not None:
                in_range(f"data.{f}", v, 1, integer=True)
        in_range("data.subset_seed", self.subset_seed, 0, integer=True)
        in_range("data.label_noise", self.label_noise, 0, 1, high_open=True)
        in_range("data.label_noise_seed", self.label_noise_seed, 0, integer=True)
        if not isinstance(self.augment, bool):
            raise ConfigError(f"data.augment={self.augment!r} is invalid; must be true or false")
        in_range("data.batch_size", self.batch_size, 1, integer=True)
        in_range("data.eval_batch_size", self.eval_batch_size, 1, integer=True)
        in_range("data.num_workers", self.num_workers, 0, integer=True)
        choice("data.imagenet_recipe", self.imagenet_recipe, IMAGENET_RECIPES)
        in_range("data.repeated_aug", self.repeated_aug, 1, integer=True)
        if self.repeated_aug > 1 and self.name != "imagenet":
            raise ValueError(f"data.repeated_aug={self.repeated_aug} is invalid for data.name={self.name!r} "
                             "(an in-memory set); allowed: 1, or > 1 with data.name='imagenet'")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DataConfig:
        """Build from a mapping (a YAML section); unknown keys are an error naming them."""
        d = section("data", d, (f.name for f in dataclasses.fields(cls)))
        for key in ("data_dir", "archive", "cache_dir"):
            if d.get(key) is not None:
                d[key] = str(Path(os.path.expandvars(str(d[key]))).expanduser())
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (for YAML and MLflow params)."""
        return dataclasses.asdict(self)
