"""A batched loader for in-memory uint8 image sets, augmenting whole batches at once.

Per epoch, one ``torch.Generator`` seeded from ``(seed, epoch)`` draws the permutation and
the augmentation parameters of every position of the epoch (crop offsets, flips), before
sharding. So:

- an epoch is a pure function of ``(seed, epoch)``: resuming at epoch e reproduces it;
- the global batch of step t under ``world_size`` ranks (the union of the ranks' batches)
  is exactly batch t of a single process whose batch size is ``world_size`` times larger,
  with the same augmentation of each image: sharding is ``positions[rank::world_size]``
  as in ``DistributedSampler``, and ``rank + world_size * k`` for k in
  ``[t*B, (t+1)*B)`` covers ``[t*B*W, (t+1)*B*W)`` exactly once.

Augmentation is the standard CIFAR one: zero-pad by ``pad`` pixels, take a random
HxW crop, flip horizontally with probability 1/2. It is one gather: output pixel (i, j) of
sample b reads padded pixel ``(oy_b + i, ox_b + j)`` (or ``ox_b + W - 1 - j`` when flipped),
so there is no per-image Python loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for ``(seed, epoch)`` (splitmix64 finaliser).

    Mixing avoids the overlap of naive ``seed + epoch`` (seed 1 epoch 0 == seed 0 epoch 1).
    """
    z = ((seed & 0xFFFFFFFF) << 32 | (epoch & 0xFFFFFFFF)) & _MASK64
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def crop_flip(images: Tensor, oy: Tensor, ox: Tensor, flip: Tensor, pad: int) -> Tensor:
    """Random-crop-with-zero-padding and horizontal flip of a uint8 NCHW batch, vectorised.

    Args:
        images: (B, C, H, W).
        oy, ox: (B,) crop offsets in ``[0, 2 * pad]`` (offset ``pad`` is the identity crop).
        flip: (B,) bool.
        pad: padding in pixels.
    """
    b, c, h, w = images.shape
    pw = w + 2 * pad
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad)).reshape(b, c, -1)
    dev = images.device
    rows = oy.to(dev)[:, None] + torch.arange(h, device=dev)  # (B, H)
    fwd = torch.arange(w, device=dev)
    cols = ox.to(dev)[:, None] + torch.where(flip.to(dev)[:, None], w - 1 - fwd, fwd)  # (B, W)
    # Flat index into the padded (H + 2 pad) x (W + 2 pad) plane; one gather for all
    # channels (about 3x faster on the CPU than advanced indexing).
    flat = (rows[:, :, None] * pw + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(padded, 2, flat).reshape(b, c, h, w)


class BatchLoader:
    """Iterate normalised float batches over in-memory uint8 images.

    Args:
        images: uint8 (N, C, H, W).
        labels: int64 (N,).
        batch_size: per-rank batch size.
        train: shuffle (per epoch) and, with ``augment``, augment; else sequential order.
        augment: crop + flip (training only).
        mean, std: per-channel normalisation in [0, 1] units.
        seed: run seed; epoch e uses ``epoch_seed(seed, e)``.
        rank, world_size: shard for data parallelism; every rank yields the same number of
            batches (positions are padded by wrapping around, as ``DistributedSampler``).
            With ``world_size == 1`` nothing is padded.
        drop_last: drop the last incomplete batch (default: ``train``).
        device: where batches go. On a non-CPU device the whole uint8 set is copied there
            once (CIFAR: 150 MB), so gathering and normalising run on the device.
        pad: crop padding in pixels (4 for CIFAR).
        hflip: allow horizontal flips (off for digits).
        dtype: floating dtype of the yielded images (float64 for exact-arithmetic checks).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        train: bool,
        augment: bool = True,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        device: torch.device | str = "cpu",
        pad: int = 4,
        hflip: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 NCHW, got {images.dtype} {tuple(images.shape)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is invalid; must be in [0, {world_size - 1}]")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid; must be an integer >= 1")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean/std need {images.shape[1]} channels, "
                             f"got {len(mean)}/{len(std)}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.long().to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.augment = augment and train
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.pad, self.hflip = pad, hflip
        self.epoch = 0
        # x_norm = (x / 255 - mean) / std = x * scale + shift, one fused multiply-add.
        m = torch.tensor(mean, dtype=dtype, device=self.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=dtype, device=self.device).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * s)
        self._shift = -m / s

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (before dropping the last batch)."""
        n = self.images.shape[0]
        return -(-n // self.world_size)  # ceil: padded like DistributedSampler

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration yields."""
        self.epoch = int(epoch)

    def _epoch_plan(self) -> tuple[Tensor, Tensor | None]:
        """(this rank's sample indices, its augmentation parameters (n, 3) or None)."""
        n = self.images.shape[0]
        total = self.num_samples * self.world_size
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=gen) if self.train else torch.arange(n)
        params = None
        if self.augment:
            # One row (oy, ox, flip) per position of the epoch, drawn before sharding and
            # padding so that it does not depend on world_size (see module docstring).
            offs = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=gen)
            flips = torch.randint(0, 2 if self.hflip else 1, (n, 1), generator=gen)
            params = torch.cat([offs, flips], 1)
        if total > n:  # wrap around so every rank has the same number of samples
            order = torch.cat([order, order[: total - n]])
            if params is not None:
                params = torch.cat([params, params[: total - n]])
        shard = slice(self.rank, None, self.world_size)
        return order[shard], (None if params is None else params[shard])

    def normalise(self, x: Tensor) -> Tensor:
        """uint8 NCHW -> normalised floats of the loader's dtype."""
        return torch.addcmul(self._shift, x.to(self._scale.dtype), self._scale)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx, params = self._epoch_plan()
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            bi = idx[sl].to(self.device)
            x = self.images[bi]
            if params is not None:
                p = params[sl]
                x = crop_flip(x, p[:, 0], p[:, 1], p[:, 2].bool(), self.pad)
            yield self.normalise(x), self.labels[bi]


def repeat_aug_sampler(dataset, *, repeats: int, seed: int, rank: int, world_size: int):
    """timm's ``RepeatAugSampler`` (DeiT's ``RASampler``) with an explicit seed.

    Each epoch shuffles the indices, repeats each ``repeats`` times in a row and deals them
    to the ranks round-robin (``[rank::world_size]``), so with ``world_size >= repeats`` the
    copies of an image land on different ranks, each augmented apart. Every rank yields
    ``len(dataset) // 256 * 256 / world_size`` samples per epoch (all of them below 256
    images), as DeiT's: an epoch costs what it costs without repeats.
    """
    from timm.data.distributed_sampler import RepeatAugSampler

    class _Seeded(RepeatAugSampler):
        # timm seeds its shuffle with the bare epoch number: mix the run seed in.
        def set_epoch(self, epoch: int) -> None:
            super().set_epoch(epoch_seed(seed, epoch))

    sampler = _Seeded(dataset, num_replicas=world_size, rank=rank, shuffle=True, num_repeats=repeats)
    sampler.set_epoch(0)
    return sampler


class DatasetLoader:
    """A ``DataLoader`` over a map-style dataset, sharded by ``DistributedSampler``.

    Same interface as ``BatchLoader`` (``set_epoch``, ``len``, yields tensors on
    ``device``). The sampler's shuffle uses ``seed`` + epoch; worker seeds come from a
    generator seeded with ``epoch_seed(seed, epoch)``. Transforms that draw from the
    global RNG (torchvision's) are reproducible only with ``num_workers > 0``, where each
    worker's RNG is seeded from that generator. ``repeats > 1`` (training) samples with
    :func:`repeat_aug_sampler` instead.
    """

    def __init__(self, dataset, batch_size: int, *, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, drop_last: bool | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, repeats: int = 1) -> None:
        from torch.utils.data import DataLoader, DistributedSampler

        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = seed
        if train and repeats > 1:
            self.sampler = repeat_aug_sampler(dataset, repeats=repeats, seed=seed, rank=rank, world_size=world_size)
        else:
            self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                              shuffle=train, seed=seed)
        self._gen = torch.Generator()
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            drop_last=train if drop_last is None else drop_last, generator=self._gen,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self._gen.manual_seed(epoch_seed(self.seed, epoch))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        nb = self.device.type == "cuda"
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=nb)
            yield (x.to(self.dtype) if x.is_floating_point() else x), y.to(self.device, non_blocking=nb)


def make_loaders(bundle, cfg, *, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 ) -> tuple[BatchLoader | DatasetLoader, BatchLoader | DatasetLoader]:
    """(train loader, test loader) for a ``DataBundle`` and its ``DataConfig``.

    In-memory bundles get ``BatchLoader`` (augmentation per ``cfg.augment``); others a
    ``DatasetLoader`` with ``cfg.num_workers`` workers (augmentation is in the transforms).
    """
    if bundle.in_memory:
        common = {"mean": bundle.mean, "std": bundle.std, "seed": seed, "rank": rank,
                  "world_size": world_size, "device": device, "hflip": bundle.hflip, "dtype": dtype}
        train = BatchLoader(bundle.train.images, bundle.train.labels, cfg.batch_size,
                            train=True, augment=cfg.augment, **common)
        test = BatchLoader(bundle.test.images, bundle.test.labels, cfg.eval_batch_size,
                           train=False, augment=False, **common)
        return train, test
    common = {"seed": seed, "rank": rank, "world_size": world_size,
              "num_workers": cfg.num_workers, "device": device, "dtype": dtype}
    return (DatasetLoader(bundle.train, cfg.batch_size, train=True, repeats=cfg.repeated_aug, **common),
            DatasetLoader(bundle.test, cfg.eval_batch_size, train=False, **common))
