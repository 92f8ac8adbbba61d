"""ImageNet from an ImageFolder tree (``data_dir/train/<wnid>/*``, ``data_dir/val/<wnid>/*``).

Transforms are timm's (``timm.data.create_transform``). Evaluation resizes to
``size / 0.875`` and centre-crops (timm's default crop_pct, DeiT's 256 -> 224).

DeiT's recipe (Touvron et al. 2021, Table 9 and their ``main.py``), piece by piece, where
each one lives here and whether the shipped DeiT configs (``tune/imagenet_deit.yaml``,
8 GPUs; ``configs/imagenet_deit_small.yaml``, 1 GPU) turn it on:

| piece | setting | where | on |
|---|---|---|---|
| RandAugment | ``rand-m9-mstd0.5-inc1`` | ``data.imagenet_recipe: deit`` (this module) | yes |
| random erasing | p 0.25, pixel mode | ``data.imagenet_recipe: deit`` | yes |
| colour jitter | 0.3, but timm drops it when RandAugment is on (so did DeiT) | | no-op |
| Mixup / CutMix | alpha 0.8 / 1.0, switch 0.5, per batch | ``mixup``, ``cutmix``, ... (``zosam.recipe``) | yes |
| label smoothing | 0.1, folded into the mixed soft targets | ``label_smoothing`` | yes |
| drop-path | 0.1 | ``model.drop_path_rate`` (the default) | yes |
| no decay on norms, biases, pos_embed, cls_token | timm's parameter groups | ``optimizer.filter_bias_and_bn`` | yes |
| repeated augmentation | 3 copies | ``data.repeated_aug`` | 8 GPUs only |
| EMA of the weights | decay 0.99996 | ``model_ema_decay`` | yes |

Why: every piece is on as DeiT trained, with two qualifications. Repeated augmentation
(an epoch sees a third of the images, each three times, augmented apart) is "one of the
key ingredients" in DeiT's ablation, at its scale: global batch 1024 over 8+ GPUs, each
copy of an image on another GPU (Hoffer et al. 2020 found its gain at large batches). On
one GPU the three copies share a batch, so the single-GPU config leaves it off. The EMA
is what DeiT's code keeps (its paper reports a gain of about 0.1 point that fine-tuning
erases); here it is evaluated as ``test_acc`` (the raw weights as
``test_acc_raw``), restricted to the sparse masks, and saved in the checkpoint.
Mixup/CutMix are drawn once per optimizer step from ``(seed, step, rank)``, so all passes
of SAM/ZO-SAM in a step see the same mixed batch; train accuracy under soft targets counts
a prediction correct when it is the soft target's argmax (the class with the larger share).
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


def _posterize(img: Any, bits_to_keep: int, **kwargs: Any) -> Any:
    """timm's posterize, also for 0 bits kept: a black image, as TensorFlow's RandAugment and
    Pillow before 13 give; Pillow 13 raises instead. DeiT's ``rand-m9-mstd0.5-inc1`` asks for
    0 bits whenever the magnitude draw reaches 10 (about 1 image in 700), which would stop
    an ImageNet run within its first epoch."""
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return posterize(img, bits_to_keep, **kwargs)


def _keep_zero_bit_posterize(transform: Any) -> Any:
    """Point the posterize ops of the RandAugment inside ``transform`` at :func:`_posterize`."""
    from timm.data.auto_augment import RandAugment, posterize

    for t in getattr(transform, "transforms", ()):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.aug_fn is posterize:
                    op.aug_fn = _posterize
    return transform


def imagenet_transforms(image_size: int, *, augment: bool, recipe: str) -> tuple[Any, Any]:
    """(train transform, eval transform) built by timm."""
    from timm.data import create_transform

    common = {"input_size": image_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if not augment:
        train_tf = create_transform(is_training=False, **common)
    elif recipe == "deit":
        train_tf = _keep_zero_bit_posterize(create_transform(is_training=True, **common, **DEIT_TRANSFORM))
    else:  # basic: random-resized crop + flip only
        train_tf = create_transform(is_training=True, **common, color_jitter=None,
                                    auto_augment=None, re_prob=0.0)
    return train_tf, create_transform(is_training=False, **common)


def deit_mixup(num_classes: int, **overrides: Any) -> Any:
    """timm ``Mixup`` with DeiT's settings (``overrides`` replace single values).

    It turns ``(x, y)`` into ``(mixed x, soft targets)``; use it with
    ``timm.loss.SoftTargetCrossEntropy``. Batches must have an even size. It draws from
    NumPy's global RNG; the training loop uses ``zosam.recipe.StepMixup`` (the run
    config's ``mixup``, ``cutmix``, ... fields, seeded per step) instead.
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
