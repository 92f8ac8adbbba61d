"""Dataset loaders, DataConfig validation and the batched loader, on small real data."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zosam.data import (
    DATASETS,
    BatchLoader,
    DataConfig,
    balanced_subset,
    load_dataset,
    make_loaders,
)
from zosam.data import cifar as cifar_mod
from zosam.data.loader import crop_flip, epoch_seed

# ---------------------------------------------------------------- DataConfig


def test_registry_lists_all_datasets() -> None:
    assert set(DATASETS.names()) == {"cifar10", "cifar100", "cifar10-jpeg", "digits", "imagenet"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"name": "foo"}, "data.name='foo' is invalid; allowed: "),
        ({"batch_size": 0}, "data.batch_size=0 is invalid"),
        ({"train_subset": -3}, "data.train_subset=-3 is invalid"),
        ({"augment": "yes"}, "data.augment='yes' is invalid"),
        ({"num_workers": 1.5}, "data.num_workers=1.5 is invalid"),
        ({"imagenet_recipe": "simclr"}, "data.imagenet_recipe='simclr' is invalid"),
        ({"bacth_size": 4}, "unknown key data.bacth_size; allowed: "),
    ],
)
def test_config_errors_name_the_field(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        DataConfig.from_dict({"name": "digits", **override})


def test_config_defaults_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = DataConfig()
    # Default archive: <repo>/../shared/data, resolved from the package location.
    repo = Path(__file__).resolve().parents[1]
    assert Path(cfg.archive) == repo.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    monkeypatch.setenv("ZOSAM_CIFAR10_JPEG", str(tmp_path / "a.tar.gz"))
    monkeypatch.setenv("ZOSAM_CACHE", str(tmp_path / "c"))
    cfg = DataConfig.from_dict({"name": "cifar10-jpeg"})
    assert cfg.archive == str(tmp_path / "a.tar.gz")
    assert cfg.cache_dir == str(tmp_path / "c")
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------- digits


def test_digits_split_is_fixed_balanced_and_disjoint() -> None:
    b = load_dataset(DataConfig(name="digits"))
    assert b.train.images.shape == (1438, 3, 32, 32) and b.test.images.shape == (359, 3, 32, 32)
    assert b.train.images.dtype == torch.uint8 and b.train.labels.dtype == torch.int64
    assert (b.num_classes, b.input_shape, b.hflip) == (10, (3, 32, 32), False)
    counts = b.test.labels.bincount()
    assert counts.min() >= 35 and counts.max() <= 37  # 20 % of each class (~180 per class)
    # No test image appears in train (digits has a few exact duplicates, so compare counts).
    flat_tr = {bytes(x.numpy()) for x in b.train.images}
    assert sum(bytes(x.numpy()) in flat_tr for x in b.test.images) < 5
    again = load_dataset(DataConfig(name="digits"))
    assert torch.equal(again.test.images, b.test.images)
    # The constants normalise the training split to about zero mean, unit variance.
    x = (b.train.images.float() / 255 - torch.tensor(b.mean).view(1, 3, 1, 1)) / torch.tensor(
        b.std
    ).view(1, 3, 1, 1)
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


def test_digits_image_size() -> None:
    b = load_dataset(DataConfig(name="digits", image_size=16, test_subset=30))
    assert b.train.images.shape[1:] == (3, 16, 16) and b.input_shape == (3, 16, 16)
    assert len(b.test) == 30 and b.test.labels.bincount().tolist() == [3] * 10


# ---------------------------------------------------------------- CIFAR-10 JPEG


def _jpeg_cfg(archive: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(name="cifar10-jpeg", archive=str(archive), cache_dir=str(cache), **kw)


def test_cifar10_jpeg_decodes_once_and_caches(
    cifar_jpeg_small: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = load_dataset(_jpeg_cfg(cifar_jpeg_small, cache_dir))
    assert b.label == "CIFAR-10 (JPEG copy)"
    assert b.train.images.shape == (200, 3, 32, 32) and b.test.images.shape == (200, 3, 32, 32)
    assert b.train.labels.bincount().tolist() == [20] * 10
    assert b.classes[0] == "airplane" and b.classes[9] == "truck" and b.num_classes == 10
    # Image k of the sorted train split is the file train/<class>/<NNNN>.jpg, decoded by PIL.
    with tarfile.open(cifar_jpeg_small) as tar:
        blob = tar.extractfile("train/bird/0003.jpg").read()
    ref = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(b.train.images[2 * 20 + 3], torch.from_numpy(ref.copy()))
    assert b.train.labels[2 * 20 + 3] == 2
    assert len(list(cache_dir.glob("cifar10-jpeg-*.npz"))) == 1

    # Second load: from the cache; decoding again would fail.
    def no_decode(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cifar_mod, "decode_jpeg_archive", no_decode)
    again = load_dataset(_jpeg_cfg(cifar_jpeg_small, cache_dir))
    assert torch.equal(again.train.images, b.train.images)
    assert again.meta["archive_sha256"] == b.meta["archive_sha256"]


def test_cifar10_jpeg_subsets_are_fixed_and_balanced(cifar_jpeg_small: Path, cache_dir: Path):
    b1 = load_dataset(_jpeg_cfg(cifar_jpeg_small, cache_dir, train_subset=50, test_subset=30))
    b2 = load_dataset(_jpeg_cfg(cifar_jpeg_small, cache_dir, train_subset=50, test_subset=30))
    b3 = load_dataset(_jpeg_cfg(cifar_jpeg_small, cache_dir, train_subset=50, subset_seed=1))
    assert b1.train.labels.bincount().tolist() == [5] * 10 and len(b1.test) == 30
    assert torch.equal(b1.train.images, b2.train.images)
    assert not torch.equal(b1.train.images, b3.train.images)
    assert b1.meta["train_subset"] == 50


def test_balanced_subset_remainder() -> None:
    labels = torch.arange(10).repeat(7)
    idx = balanced_subset(labels, 23, seed=0, num_classes=10)
    assert labels[idx].bincount().tolist() == [3, 3, 3] + [2] * 7
    assert idx.unique().numel() == 23


def test_missing_archive_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.archive=.*does not exist"):
        load_dataset(_jpeg_cfg(tmp_path / "nope.tar.gz", tmp_path))


# ---------------------------------------------------------------- official CIFAR


@pytest.mark.parametrize(
    ("name", "archive", "md5"),
    [
        ("cifar10", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
        ("cifar100", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
    ],
)
def test_official_cifar_missing_dir_says_where_to_get_it(
    tmp_path: Path, name: str, archive: str, md5: str
) -> None:
    with pytest.raises(FileNotFoundError) as e:
        load_dataset(DataConfig(name=name, data_dir=str(tmp_path)))
    assert archive in str(e.value) and md5 in str(e.value) and "data_dir" in str(e.value)


# ---------------------------------------------------------------- ImageNet-style tree


@pytest.fixture
def image_tree(cifar_jpeg_small: Path, tmp_path: Path) -> Path:
    """train/ and val/ with 3 classes x 4 real images, upscaled to 48 px."""
    root = tmp_path / "inet"
    with tarfile.open(cifar_jpeg_small) as tar:
        for split, src in (("train", "train"), ("val", "test")):
            for cls in ("airplane", "cat", "ship"):
                (root / split / cls).mkdir(parents=True)
                for i in range(4):
                    blob = tar.extractfile(f"{src}/{cls}/{i:04d}.jpg").read()
                    im = Image.open(io.BytesIO(blob)).convert("RGB").resize((48, 48))
                    im.save(root / split / cls / f"{i}.jpg")
    return root


@pytest.mark.parametrize("recipe", ["deit", "basic"])
def test_imagenet_tree_with_timm_transforms(image_tree: Path, recipe: str) -> None:
    cfg = DataConfig(name="imagenet", data_dir=str(image_tree), image_size=32, batch_size=4,
                     eval_batch_size=6, num_workers=0, imagenet_recipe=recipe)
    b = load_dataset(cfg)
    assert (b.num_classes, b.input_shape, b.in_memory) == (3, (3, 32, 32), False)
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    train, test = make_loaders(b, cfg, seed=0, rank=1, world_size=2)
    assert len(train) == 1 and len(test) == 1  # 12 images / 2 ranks = 6 per rank
    train.set_epoch(3)
    xb, yb = next(iter(train))
    assert xb.shape == (4, 3, 32, 32) and yb.shape == (4,)


def test_deit_mixup_helper() -> None:
    from zosam.data import deit_mixup

    mix = deit_mixup(num_classes=5)
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    clean = x.clone()  # timm mixes in place
    xm, ym = mix(x, y)
    assert xm.shape == clean.shape and not torch.equal(xm, clean)
    assert ym.shape == (4, 5) and torch.allclose(ym.sum(1), torch.ones(4))
    assert ym.max() < 1  # label smoothing 0.1 plus mixing: no hard targets


def test_imagenet_missing_tree(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train/<class>/ and val/<class>/"):
        load_dataset(DataConfig(name="imagenet", data_dir=str(tmp_path)))


# ---------------------------------------------------------------- BatchLoader


def _images(n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n)


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _loader(x, y, bs=8, **kw) -> BatchLoader:
    kw.setdefault("train", True)
    return BatchLoader(x, y, bs, mean=MEAN, std=STD, seed=kw.pop("seed", 7), **kw)


def _epoch(loader: BatchLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_same_seed_and_epoch_give_identical_batches() -> None:
    x, y = _images()
    a, b = _epoch(_loader(x, y), 2), _epoch(_loader(x, y), 2)
    assert len(a) == 6 == len(_loader(x, y))  # 50 // 8, last partial batch dropped
    assert all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(a, b, strict=True))
    c = _epoch(_loader(x, y), 3)
    assert not torch.equal(a[0][1], c[0][1])  # another epoch, another order
    d = _epoch(_loader(x, y, seed=8), 2)
    assert not torch.equal(a[0][1], d[0][1])


def test_loader_leaves_global_rng_alone() -> None:
    x, y = _images()
    state = torch.get_rng_state()
    _epoch(_loader(x, y), 0)
    assert torch.equal(state, torch.get_rng_state())


def test_epoch_seed_mixes() -> None:
    seeds = {epoch_seed(s, e) for s in range(20) for e in range(20)}
    assert len(seeds) == 400 and all(0 <= v < 2**63 for v in seeds)


@pytest.mark.parametrize(("n", "world_size", "bs"), [(48, 2, 8), (50, 3, 4), (37, 4, 3)])
def test_shards_equal_length_and_match_single_process(n: int, world_size: int, bs: int):
    """Union of the ranks' step-t batches == step t of one process with world_size x batch."""
    x, y = _images(n)
    shards = [_epoch(_loader(x, y, bs, rank=r, world_size=world_size), 1)
              for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1  # every rank: same number of batches
    single = _epoch(_loader(x, y, bs * world_size), 1)
    for t, (xs, ys) in enumerate(single):
        # Positions rank + world_size * k interleave back into the global batch.
        xg = torch.stack([shards[r][t][0] for r in range(world_size)], 1).flatten(0, 1)
        yg = torch.stack([shards[r][t][1] for r in range(world_size)], 1).flatten(0, 1)
        assert torch.equal(yg, ys) and torch.equal(xg, xs)


def test_eval_loader_is_sequential_unaugmented_complete() -> None:
    x, y = _images(50)
    ld = _loader(x, y, 16, train=False, augment=True)
    batches = _epoch(ld, 5)
    assert len(ld) == 4 and [len(b[1]) for b in batches] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    xs = torch.cat([b[0] for b in batches])
    ref = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(xs, ref)


def _crops_matching(img: torch.Tensor, padded: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Every (oy, ox, flip) whose crop of ``padded`` equals ``img``."""
    h = img.shape[-1]
    hits = []
    for oy in range(padded.shape[-2] - h + 1):
        for ox in range(padded.shape[-1] - h + 1):
            crop = padded[:, oy:oy + h, ox:ox + h]
            hits += [(oy, ox, f) for f, c in ((False, crop), (True, crop.flip(-1)))
                     if torch.equal(img, c)]
    return hits


def test_training_batches_are_augmented_crops_of_their_images() -> None:
    x, y = _images(40)
    ld = _loader(x, y, 40)
    xb, yb = _epoch(ld, 0)[0]
    raw = torch.round(xb * torch.tensor(STD).view(1, 3, 1, 1) * 255
                      + torch.tensor(MEAN).view(1, 3, 1, 1) * 255).to(torch.uint8)
    padded = torch.nn.functional.pad(x[yb], (4, 4, 4, 4))
    flipped = 0
    for i in range(40):  # each output is one of the 9x9x2 crops of its padded source
        found = _crops_matching(raw[i], padded[i])
        assert found, f"sample {i} is not a crop/flip of its source"
        flipped += any(f for _, _, f in found)
    assert 5 < flipped < 35  # flips happen about half the time


def test_crop_flip_matches_reference() -> None:
    x, _ = _images(6)
    g = torch.Generator().manual_seed(0)
    oy, ox = torch.randint(0, 9, (6,), generator=g), torch.randint(0, 9, (6,), generator=g)
    flip = torch.tensor([True, False, True, False, False, True])
    out = crop_flip(x, oy, ox, flip, 4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(6):
        ref = padded[i, :, oy[i]:oy[i] + 8, ox[i]:ox[i] + 8]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)
    ident = crop_flip(x, torch.full((6,), 4), torch.full((6,), 4), torch.zeros(6, dtype=bool), 4)
    assert torch.equal(ident, x)


def test_no_flip_option() -> None:
    x, y = _images(40)
    # With zero padding and no flips the only possible output is the image itself.
    xb, yb = _epoch(_loader(x, y, 40, pad=0, hflip=False), 0)[0]
    raw = torch.round(xb * torch.tensor(STD).view(1, 3, 1, 1) * 255
                      + torch.tensor(MEAN).view(1, 3, 1, 1) * 255).to(torch.uint8)
    assert torch.equal(raw, x[yb])


def test_make_loaders_on_digits() -> None:
    cfg = DataConfig(name="digits", batch_size=64, eval_batch_size=100)
    b = load_dataset(cfg)
    train, test = make_loaders(b, cfg, seed=0)
    assert len(train) == 1438 // 64 and len(test) == 4
    xb, yb = next(iter(train))
    assert xb.shape == (64, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert not train.hflip  # digits are never mirrored


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"rank": 2, "world_size": 2}, "rank=2 is invalid"), ({"bs": 0}, "batch_size=0")],
)
def test_loader_argument_errors(kw: dict, message: str) -> None:
    x, y = _images(10)
    with pytest.raises(ValueError, match=message):
        _loader(x, y, **kw)


def test_repeat_aug_sampler_is_seeded_repeats_and_shards() -> None:
    from zosam.data.loader import repeat_aug_sampler

    data = list(range(30))

    def epoch(seed: int, e: int, world: int) -> list[list[int]]:
        out = []
        for rank in range(world):
            s = repeat_aug_sampler(data, repeats=3, seed=seed, rank=rank, world_size=world)
            s.set_epoch(e)
            out.append(list(s))
        return out

    assert epoch(1, 2, 3) == epoch(1, 2, 3)  # a pure function of (seed, epoch)
    assert epoch(1, 2, 3) != epoch(2, 2, 3) and epoch(1, 2, 3) != epoch(1, 3, 3)
    (single,) = epoch(1, 2, 1)
    # One process: each image three times in a row; as many samples as the set has.
    assert len(single) == 30 and all(single[i] == single[i + 1] == single[i + 2] for i in range(0, 30, 3))
    # Three ranks: rank r takes positions r, r + 3, ... of that sequence, so the three copies
    # of an image go to three different ranks, each rank seeing 10 distinct images.
    ranks = epoch(1, 2, 3)
    assert [len(r) for r in ranks] == [10, 10, 10]
    assert all(ranks[0] == ranks[r] for r in (1, 2)) and len(set(ranks[0])) == 10


def test_deit_randaugment_posterize_at_full_magnitude_gives_black_not_an_error() -> None:
    """rand-m9-mstd0.5-inc1 draws magnitude 10 now and then: PosterizeIncreasing then keeps
    0 bits, which Pillow 13 rejects; the DeiT transform must give a black image instead."""
    from timm.data.auto_augment import RandAugment

    from zosam.data.imagenet import imagenet_transforms

    train_tf, _ = imagenet_transforms(32, augment=True, recipe="deit")
    (ra,) = [t for t in train_tf.transforms if isinstance(t, RandAugment)]
    (op,) = [o for o in ra.ops if o.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
    img = Image.new("RGB", (32, 32), (200, 100, 50))
    out = op(img)
    assert out.size == (32, 32) and np.asarray(out).max() == 0
    op.magnitude = 9  # 1 bit kept: the top bit of each channel
    assert np.asarray(op(img))[0, 0].tolist() == [128, 0, 0]
