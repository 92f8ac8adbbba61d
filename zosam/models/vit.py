"""DeiT-Tiny and DeiT-Small from timm, always randomly initialised (nothing downloads).

``img_size`` and ``patch_size`` adapt them to small inputs (e.g. 32 px with 4 px patches:
an 8x8 token grid); the defaults are DeiT's 224 px with 16 px patches.
"""

from __future__ import annotations

from torch import nn

from zosam.models.registry import MODELS
from zosam.validate import in_range

_TIMM_NAMES = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224"}


def _deit(name: str, num_classes: int, img_size: int, patch_size: int, drop_path_rate: float,
          in_channels: int) -> nn.Module:
    in_range("model.img_size", img_size, 1, integer=True)
    in_range("model.patch_size", patch_size, 1, img_size, integer=True)
    in_range("model.drop_path_rate", drop_path_rate, 0, 1, high_open=True)
    if img_size % patch_size:
        raise ValueError(f"model.patch_size={patch_size} is invalid; must divide "
                         f"model.img_size={img_size}")
    import timm  # heavy: import on use

    # pretrained=False: timm builds the architecture only and never fetches weights.
    return timm.create_model(_TIMM_NAMES[name], pretrained=False, num_classes=num_classes,
                             img_size=img_size, patch_size=patch_size, in_chans=in_channels,
                             drop_path_rate=drop_path_rate)


@MODELS.register("deit_tiny")
def deit_tiny(num_classes: int = 1000, img_size: int = 224, patch_size: int = 16,
              drop_path_rate: float = 0.1, in_channels: int = 3) -> nn.Module:
    """DeiT-Tiny (5.7 M weights at 224 px / 1000 classes); DeiT's drop-path 0.1."""
    return _deit("deit_tiny", num_classes, img_size, patch_size, drop_path_rate, in_channels)


@MODELS.register("deit_small")
def deit_small(num_classes: int = 1000, img_size: int = 224, patch_size: int = 16,
               drop_path_rate: float = 0.1, in_channels: int = 3) -> nn.Module:
    """DeiT-Small (22 M weights at 224 px / 1000 classes); DeiT's drop-path 0.1."""
    return _deit("deit_small", num_classes, img_size, patch_size, drop_path_rate, in_channels)
