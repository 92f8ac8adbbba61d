"""CIFAR-10-C at run time: read a set (official or generated) and evaluate a model on it.

Layout (official, Hendrycks & Dietterich 2019, and what ``zosam.data.generate_cifar10c``
writes): ``<corruption>.npy`` uint8 (S*N, 32, 32, 3), severities stacked in blocks of N
test images (official: S = 5, severities 1..5, N = 10,000), and ``labels.npy`` (S*N,). A
generated set also has ``metadata.json`` with ``"generated": true``; such sets are
labelled "CIFAR-10-C-style (generated)", never CIFAR-10-C.

:func:`corruption_accuracy` is the one corruption evaluator: the training engine (at the
end of a run) and the robustness benchmark (on saved checkpoints) both call it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from zosam.data.loader import BatchLoader
from zosam.data.registry import TensorSplit
from zosam.validate import choice

BENCHMARK_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
)
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)
GENERATED_LABEL = "CIFAR-10-C-style (generated)"
OFFICIAL_LABEL = "CIFAR-10-C"
OFFICIAL_MD5 = "56bf5dcef84df0e2308c6dcbcbbd8499"  # CIFAR-10-C.tar, Zenodo record 2535967


@dataclass
class CorruptionSet:
    """A CIFAR-10-C directory: official (no metadata) or generated (``metadata.json``)."""

    root: Path
    generated: bool
    corruptions: list[str]
    severities: list[int]
    meta: dict

    @property
    def label(self) -> str:
        return GENERATED_LABEL if self.generated else OFFICIAL_LABEL

    @classmethod
    def open(cls, root: str | os.PathLike) -> CorruptionSet:
        root = Path(root)
        if not (root / "labels.npy").is_file():
            raise FileNotFoundError(
                f"no CIFAR-10-C set at {str(root)!r} (labels.npy missing). Get CIFAR-10-C.tar "
                f"from Zenodo record 2535967 (md5 {OFFICIAL_MD5}) or generate one with "
                f"zosam.data.generate_cifar10c."
            )
        meta_file = root / "metadata.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        present = [c for c in ALL_CORRUPTIONS if (root / f"{c}.npy").is_file()]
        return cls(root, bool(meta.get("generated", False)), present,
                   list(meta.get("severities", SEVERITIES)), meta)

    def load(self, corruption: str, severity: int) -> TensorSplit:
        """The block of one corruption and severity, as uint8 NCHW + int64 labels."""
        choice("corruption", corruption, self.corruptions)
        choice("severity", severity, self.severities)
        arr = np.load(self.root / f"{corruption}.npy", mmap_mode="r")
        labels = np.load(self.root / "labels.npy")
        n = arr.shape[0] // len(self.severities)
        k = self.severities.index(severity)
        block = np.ascontiguousarray(arr[k * n:(k + 1) * n].transpose(0, 3, 1, 2))
        return TensorSplit(torch.from_numpy(block),
                           torch.from_numpy(labels[k * n:(k + 1) * n].astype(np.int64)))


def load_cifar10c(root: str | os.PathLike, corruption: str, severity: int) -> TensorSplit:
    """One corruption at one severity from an official or generated CIFAR-10-C directory."""
    return CorruptionSet.open(root).load(corruption, severity)


def corruption_accuracy(
    cset: CorruptionSet,
    accuracy: Callable[[Iterable[tuple[Tensor, Tensor]]], float],
    *,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    subset: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Accuracy on every corruption x severity block of ``cset``, keyed ``"<corruption>.<severity>"``.

    Args:
        cset: the opened set.
        accuracy: the caller's evaluation of a loader of normalised ``(x, y)`` batches (the
            engine's sums over ranks; a benchmark's runs one model).
        batch_size, mean, std, device, dtype: how the blocks are batched and normalised,
            as the model was trained.
        subset: the first ``subset`` images of each block (``None``: all).
        rank, world_size: each rank evaluates its shard of every block.
    """
    out: dict[str, float] = {}
    for c in cset.corruptions:
        for s in cset.severities:
            split = cset.load(c, s)
            images, labels = split.images[:subset], split.labels[:subset]
            loader = BatchLoader(images, labels, batch_size, train=False, augment=False, mean=mean, std=std,
                                 seed=0, rank=rank, world_size=world_size, device=device, dtype=dtype)
            out[f"{c}.{s}"] = accuracy(loader)
    return out
