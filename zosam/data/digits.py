"""scikit-learn's bundled 8x8 digits (1,797 real images), upsampled, for fast real runs.

Images are scaled from 0..16 to 0..255, upsampled bilinearly to ``image_size`` (default
32) and replicated to 3 channels, so every CIFAR model runs on them unchanged. The
train/test split is fixed (20 % of each class to test, drawn with seed 0), independent of
the run seed. Flips are off for this set (a mirrored digit is another symbol).
"""

from __future__ import annotations

import torch

from zosam.data.config import DataConfig
from zosam.data.registry import DATASETS, DataBundle, TensorSplit

# Measured on the 32x32 upsampled training split (identical for all three channels).
DIGITS_MEAN = (0.3059,) * 3
DIGITS_STD = (0.3241,) * 3
_TEST_FRACTION = 0.2


def digits_arrays(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as uint8 (N, 3, S, S) and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                            align_corners=False)
    x = x.round().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, torch.as_tensor(d.target, dtype=torch.long)


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (train, test) indices with ``round(test_fraction * n_c)`` of each class in test."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = round(test_fraction * idx.numel())
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


@DATASETS.register("digits")
def digits(cfg: DataConfig) -> DataBundle:
    """The digits set at ``cfg.image_size`` (default 32), 3 channels, fixed 80/20 split."""
    size = cfg.image_size or 32
    x, y = digits_arrays(size)
    tr, te = stratified_split(y, _TEST_FRACTION, seed=0)
    return DataBundle("digits", "scikit-learn digits (8x8 upsampled)",
                      TensorSplit(x[tr], y[tr]), TensorSplit(x[te], y[te]), 10,
                      (3, size, size), DIGITS_MEAN, DIGITS_STD, hflip=False,
                      classes=[str(i) for i in range(10)], meta={"image_size": size})
