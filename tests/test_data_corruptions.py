"""CIFAR-10-C: the generator (all 15 benchmark corruptions) and the reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from zosam.data import (
    BENCHMARK_CORRUPTIONS,
    CorruptionSet,
    DataConfig,
    generate_cifar10c,
    load_cifar10c,
    load_dataset,
)
from zosam.data.corruptions import CIFAR_CONSTANTS, corrupt_image

N = 6  # clean test images


@pytest.fixture(scope="module")
def clean(cifar_jpeg_small: Path, tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache")
    b = load_dataset(DataConfig(name="cifar10-jpeg", archive=str(cifar_jpeg_small),
                                cache_dir=str(cache), test_subset=N))
    return b.test


@pytest.fixture(scope="module")
def generated(clean, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("c10c")
    return generate_cifar10c(clean.images, clean.labels, out, BENCHMARK_CORRUPTIONS, (1, 5),
                             seed=3, source="test")


def test_layout_and_metadata(generated: Path, clean) -> None:
    for name in BENCHMARK_CORRUPTIONS:
        arr = np.load(generated / f"{name}.npy")
        assert arr.shape == (2 * N, 32, 32, 3) and arr.dtype == np.uint8, name
    labels = np.load(generated / "labels.npy")
    assert labels.tolist() == clean.labels.tolist() * 2
    meta = json.loads((generated / "metadata.json").read_text())
    assert meta["generated"] is True and meta["label"] == "CIFAR-10-C-style (generated)"
    assert meta["package"] == "imagecorruptions-imaug" and meta["severities"] == [1, 5]
    # All 15 benchmark corruptions have CIFAR-10-C constants; they are recorded.
    assert set(meta["constants"].values()) == {"cifar10-c"}
    assert meta["constants_values"]["gaussian_noise"] == [0.04, 0.06, 0.08, 0.09, 0.1]
    cs = CorruptionSet.open(generated)
    assert cs.generated and cs.label == "CIFAR-10-C-style (generated)"
    assert cs.corruptions == list(BENCHMARK_CORRUPTIONS) and cs.severities == [1, 5]


def test_severity_5_is_further_from_clean_than_severity_1(generated: Path, clean) -> None:
    ref = clean.images.float()
    dist = {}
    for name in BENCHMARK_CORRUPTIONS:
        d = [(load_cifar10c(generated, name, s).images.float() - ref).abs().mean().item()
             for s in (1, 5)]
        dist[name] = d
    # Every corruption changes the image at severity 1 already.
    assert all(d1 > 0.5 for d1, _ in dist.values()), dist
    assert np.mean([d5 for _, d5 in dist.values()]) > 1.5 * np.mean(
        [d1 for d1, _ in dist.values()])
    # Per corruption too, except elastic_transform: CIFAR-10-C's severity 1 is a pure
    # affine warp of up to 2.56 px, severity 5 a 0.96 px warp plus a small elastic field,
    # so pixel distance is not monotone in severity there (a property of the constants).
    for name, (d1, d5) in dist.items():
        if name != "elastic_transform":
            assert d5 > d1, (name, d1, d5)


def test_reader_returns_the_right_block(generated: Path, clean) -> None:
    split = load_cifar10c(generated, "contrast", 5)
    raw = np.load(generated / "contrast.npy")[N:]
    assert split.images.shape == (N, 3, 32, 32) and split.images.dtype == torch.uint8
    assert torch.equal(split.images, torch.from_numpy(raw.transpose(0, 3, 1, 2).copy()))
    assert torch.equal(split.labels, clean.labels) and split.labels.dtype == torch.int64
    with pytest.raises(ValueError, match="severity=3 is invalid"):
        load_cifar10c(generated, "contrast", 3)
    with pytest.raises(ValueError, match="corruption='speckle_noise' is invalid"):
        load_cifar10c(generated, "speckle_noise", 1)


def test_generation_is_deterministic(clean, tmp_path: Path) -> None:
    names = ("glass_blur", "snow", "fog")
    a = generate_cifar10c(clean.images[:2], clean.labels[:2], tmp_path / "a", names, (2,), 9)
    b = generate_cifar10c(clean.images[:2], clean.labels[:2], tmp_path / "b", names, (2,), 9)
    c = generate_cifar10c(clean.images[:2], clean.labels[:2], tmp_path / "c", names, (2,), 10)
    for n in names:
        assert np.array_equal(np.load(a / f"{n}.npy"), np.load(b / f"{n}.npy"))
        assert not np.array_equal(np.load(a / f"{n}.npy"), np.load(c / f"{n}.npy"))


def test_imagenet_constants_are_harsher(clean) -> None:
    img = clean.images[0].permute(1, 2, 0).numpy().copy()
    ref = img.astype(float)
    for name in ("gaussian_noise", "contrast", "pixelate"):
        d_c = np.abs(corrupt_image(img, name, 3, 0, "cifar") - ref).mean()
        d_i = np.abs(corrupt_image(img, name, 3, 0, "imagenet") - ref).mean()
        assert d_i > d_c, name


def test_official_layout_without_metadata(tmp_path: Path) -> None:
    """An official-style directory: 5 severity blocks, uint8 labels, no metadata.json."""
    g = np.random.default_rng(0)
    blocks = g.integers(0, 256, (5 * 4, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "fog.npy", blocks)
    np.save(tmp_path / "labels.npy", np.tile(np.arange(4, dtype=np.uint8), 5))
    cs = CorruptionSet.open(tmp_path)
    assert not cs.generated and cs.label == "CIFAR-10-C" and cs.corruptions == ["fog"]
    s3 = cs.load("fog", 3)
    assert torch.equal(s3.images, torch.from_numpy(blocks[8:12].transpose(0, 3, 1, 2).copy()))
    assert s3.labels.tolist() == [0, 1, 2, 3]


def test_missing_set_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="56bf5dcef84df0e2308c6dcbcbbd8499"):
        CorruptionSet.open(tmp_path)


def test_generator_argument_errors(clean, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="corruption='rain' is invalid"):
        generate_cifar10c(clean.images, clean.labels, tmp_path, ["rain"])
    with pytest.raises(ValueError, match="severity=6 is invalid"):
        generate_cifar10c(clean.images, clean.labels, tmp_path, ["fog"], [6])
    assert set(BENCHMARK_CORRUPTIONS) <= set(CIFAR_CONSTANTS)


def test_engine_and_benchmark_share_the_evaluator(generated: Path, cifar_jpeg_small: Path, tmp_path: Path) -> None:
    """The engine's corrupt_acc.<c>.<s> and the robustness benchmark's blocks are one evaluator's
    numbers: both equal a count by hand over the first ``corruption_subset`` images of each block."""
    from zosam.bench.robustness import evaluate_run
    from zosam.config import RunConfig
    from zosam.engine import Trainer

    cfg = RunConfig.from_dict({
        "data": {"name": "cifar10-jpeg", "archive": str(cifar_jpeg_small), "cache_dir": str(tmp_path),
                 "train_subset": 20, "test_subset": N, "batch_size": 4, "eval_batch_size": 4},
        "model": {"name": "tiny_cnn", "width": 4}, "epochs": 1, "device": "cpu",
        "eval": {"corruptions": str(generated), "corruption_subset": 4}, "tracking": {"enabled": False}})
    trainer = Trainer(cfg, log=None)
    engine = trainer.evaluate_corruptions()
    cs = CorruptionSet.open(generated)
    model = trainer.model.eval()
    mean = torch.tensor(trainer.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(trainer.data.std).view(1, 3, 1, 1)
    by_hand = {}
    with torch.no_grad():
        for c in cs.corruptions:
            for s in cs.severities:
                block = cs.load(c, s)
                x = (block.images[:4].float() / 255 - mean) / std
                by_hand[f"{c}.{s}"] = float((model(x).argmax(1) == block.labels[:4]).float().mean())
    assert {k.removeprefix("corrupt_acc."): v for k, v in engine.items() if k.startswith("corrupt_acc.")} \
        == pytest.approx(by_hand)
    assert engine["corrupt_acc_mean"] == pytest.approx(sum(by_hand.values()) / len(by_hand))
    assert engine["corrupt_set_generated"] == 1.0
    # The benchmark evaluates whole blocks (N images each) with the same evaluator.
    bench = evaluate_run(model, trainer.data.test, cs, mean=trainer.data.mean, std=trainer.data.std,
                         batch_size=4, device=torch.device("cpu"))
    assert set(bench) == {"clean", *by_hand}
    full = {}
    with torch.no_grad():
        for key in by_hand:
            c, s = key.rsplit(".", 1)
            block = cs.load(c, int(s))
            full[key] = float((model((block.images.float() / 255 - mean) / std).argmax(1) == block.labels)
                              .float().mean())
    assert {k: v for k, v in bench.items() if k != "clean"} == pytest.approx(full)
