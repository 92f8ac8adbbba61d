"""ImageNet from an ImageFolder tree (``data_dir/train/<wnid>/*``, ``data_dir/val/<wnid>/*``).

Transforms are timm's (``timm.data.create_transform``). The ``deit`` recipe is DeiT's
(Touvron et al. 2021): RandAugment ``rand-m9-mstd0.5-inc1``, colour jitter 0.3, bicubic
interpolation, random erasing 0.25 (pixel mode); mixup 0.8 / cutmix 1.0 with label
smoothing 0.1 come from ``deit_mixup`` and are applied by the training loop on batches.
Evaluation resizes to ``size / 0.875`` and centre-crops (timm's default crop_pct).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zosam.data.config import DataConfig
from zosam.data.registry import DATASETS, DataBundle

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# DeiT's training-time augmentation (their main.py defaults).
DEIT_TRANSFORM = {
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "color_jitter": 0.3,
    "interpolation": "bicubic",
    "re_prob": 0.25,
    "re_mode": "pixel",
    "re_count": 1,
}
DEIT_MIXUP = {
    "mixup_alpha": 0.8,
    "cutmix_alpha": 1.0,
    "prob": 1.0,
    "switch_prob": 0.5,
    "mode": "batch",
    "label_smoothing": 0.1,
}


def imagenet_transforms(image_size: int, *, augment: bool, recipe: str) -> tuple[Any, Any]:
    """(train transform, eval transform) built by timm."""
    from timm.data import create_transform

    common = {"input_size": image_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if not augment:
        train_tf = create_transform(is_training=False, **common)
    elif recipe == "deit":
        train_tf = create_transform(is_training=True, **common, **DEIT_TRANSFORM)
    else:  # basic: random-resized crop + flip only
        train_tf = create_transform(is_training=True, **common, color_jitter=None,
                                    auto_augment=None, re_prob=0.0)
    return train_tf, create_transform(is_training=False, **common)


def deit_mixup(num_classes: int, **overrides: Any) -> Any:
    """timm ``Mixup`` with DeiT's settings (``overrides`` replace single values).

    It turns ``(x, y)`` into ``(mixed x, soft targets)``; use it with
    ``timm.loss.SoftTargetCrossEntropy``. Batches must have an even size.
    """
    from timm.data import Mixup

    return Mixup(**{**DEIT_MIXUP, **overrides}, num_classes=num_classes)


@DATASETS.register("imagenet")
def imagenet(cfg: DataConfig) -> DataBundle:
    """ImageNet-style tree ``data_dir/{train,val}/<class>/<image>`` (any number of classes)."""
    root = Path(cfg.data_dir) if cfg.data_dir else None
    if root is None or not (root / "train").is_dir() or not (root / "val").is_dir():
        raise FileNotFoundError(
            f"imagenet: data.data_dir={cfg.data_dir!r} must contain train/<class>/ and "
            f"val/<class>/ folders (ILSVRC-2012 from https://image-net.org, val images moved "
            f"into class folders). Nothing is downloaded."
        )
    from torchvision.datasets import ImageFolder

    size = cfg.image_size or 224
    train_tf, eval_tf = imagenet_transforms(size, augment=cfg.augment,
                                            recipe=cfg.imagenet_recipe)
    train = ImageFolder(str(root / "train"), transform=train_tf)
    test = ImageFolder(str(root / "val"), transform=eval_tf)
    if train.classes != test.classes:
        raise ValueError(f"imagenet: train/ and val/ under {root} have different classes")
    return DataBundle("imagenet", "ImageNet", train, test, len(train.classes), (3, size, size),
                      IMAGENET_MEAN, IMAGENET_STD, classes=list(train.classes),
                      meta={"recipe": cfg.imagenet_recipe if cfg.augment else "none"})
