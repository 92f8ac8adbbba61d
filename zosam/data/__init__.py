"""Datasets (one registry, no network), the batched in-memory loader, CIFAR-10-C.

``load_dataset(DataConfig(...)) -> DataBundle``; ``make_loaders(bundle, cfg, seed=...)``
gives a train and a test loader (``BatchLoader`` for in-memory sets, a sharded
``DataLoader`` wrapper otherwise), both with ``set_epoch`` and ``len``.

Registered datasets: ``cifar10``, ``cifar100`` (official pickles), ``cifar10-jpeg`` (the
JPEG copy, decoded once and cached), ``imagenet`` (ImageFolder tree, timm transforms),
``digits`` (scikit-learn, upsampled). CIFAR-10-C is read with ``load_cifar10c`` /
``CorruptionSet`` (``cifar10c``), a model evaluated on it with ``corruption_accuracy``, and a
CIFAR-10-C-style set generated offline with ``generate_cifar10c`` (``corruptions``).
"""

from zosam.data import cifar, digits, imagenet  # noqa: F401  (register datasets)
from zosam.data.cifar10c import BENCHMARK_CORRUPTIONS, CorruptionSet, corruption_accuracy, load_cifar10c
from zosam.data.config import DataConfig, default_archive, default_cache_dir
from zosam.data.corruptions import generate_cifar10c
from zosam.data.imagenet import deit_mixup
from zosam.data.load import balanced_subset, load_dataset, noisy_labels
from zosam.data.loader import BatchLoader, DatasetLoader, epoch_seed, make_loaders
from zosam.data.registry import DATASETS, DataBundle, TensorSplit

__all__ = [
    "BENCHMARK_CORRUPTIONS",
    "DATASETS",
    "BatchLoader",
    "CorruptionSet",
    "DataBundle",
    "DataConfig",
    "DatasetLoader",
    "TensorSplit",
    "balanced_subset",
    "corruption_accuracy",
    "default_archive",
    "default_cache_dir",
    "deit_mixup",
    "epoch_seed",
    "generate_cifar10c",
    "load_cifar10c",
    "load_dataset",
    "make_loaders",
    "noisy_labels",
]
