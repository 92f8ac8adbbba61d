"""``load_dataset``: the registered loader, then the configured subsets and label noise."""

from __future__ import annotations

import torch
from torch import Tensor

from zosam.data.config import DataConfig
from zosam.data.registry import DATASETS, DataBundle, TensorSplit


def balanced_subset(labels: Tensor, n: int, seed: int, num_classes: int) -> Tensor:
    """Indices of a fixed class-balanced subset of ``n`` samples, sorted.

    Each class gets ``n // num_classes`` samples, the first ``n % num_classes`` classes one
    more (capped by what the class has). The draw uses its own generator, so it depends on
    ``seed`` only.
    """
    if n >= labels.numel():
        return torch.arange(labels.numel())
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        k = n // num_classes + (1 if c < n % num_classes else 0)
        picked.append(idx[torch.randperm(idx.numel(), generator=gen)[:k]])
    return torch.cat(picked).sort().values


def apply_subsets(bundle: DataBundle, cfg: DataConfig) -> DataBundle:
    """Replace the in-memory splits by ``cfg.train_subset`` / ``cfg.test_subset`` subsets."""
    for split_name, n in (("train", cfg.train_subset), ("test", cfg.test_subset)):
        split = getattr(bundle, split_name)
        if n is None:
            continue
        if not isinstance(split, TensorSplit):
            raise ValueError(f"data.{split_name}_subset is only supported for in-memory "
                             f"datasets, not {bundle.name!r}")
        # Different seeds per split so that equal sizes do not pick aligned positions.
        idx = balanced_subset(split.labels, n, cfg.subset_seed + (split_name == "test"),
                              bundle.num_classes)
        setattr(bundle, split_name, TensorSplit(split.images[idx], split.labels[idx]))
        bundle.meta[f"{split_name}_subset"] = int(idx.numel())
    return bundle


def noisy_labels(labels: Tensor, rate: float, seed: int, num_classes: int) -> Tensor:
    """A copy of ``labels`` with symmetric noise: exactly ``round(rate * n)`` samples flipped.

    The flipped samples are a uniform draw without replacement; each gets a class drawn
    uniformly among the ``num_classes - 1`` others (so the realised noise rate is exact).
    Everything is drawn from one generator seeded with ``seed`` alone.
    """
    out = labels.clone()
    k = round(rate * labels.numel())
    if k == 0:
        return out
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(labels.numel(), generator=gen)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=gen)  # never 0: the class always changes
    out[idx] = (labels[idx] + shift) % num_classes
    return out


def apply_label_noise(bundle: DataBundle, cfg: DataConfig) -> DataBundle:
    """Replace the training labels by ``noisy_labels`` (``cfg.label_noise > 0``); test untouched."""
    if cfg.label_noise == 0:
        return bundle
    if not isinstance(bundle.train, TensorSplit):
        raise ValueError(f"data.label_noise is only supported for in-memory datasets, not {bundle.name!r}")
    clean = bundle.train.labels
    noisy = noisy_labels(clean, cfg.label_noise, cfg.label_noise_seed, bundle.num_classes)
    bundle.train = TensorSplit(bundle.train.images, noisy)
    bundle.meta["label_noise_flipped"] = int((noisy != clean).sum())
    return bundle


def load_dataset(cfg: DataConfig) -> DataBundle:
    """Load the dataset named by ``cfg.name``; apply the configured subsets, then label noise."""
    bundle = DATASETS.get(cfg.name)(cfg)
    bundle.meta.setdefault("train_size", len(bundle.train))
    bundle.meta.setdefault("test_size", len(bundle.test))
    return apply_label_noise(apply_subsets(bundle, cfg), cfg)
