"""Masking end to end: exact realised density for every method, checkpoints, reports, FLOPs."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zosam.models import create_model
from zosam.sparse import (
    METHODS,
    Masking,
    SparsityConfig,
    count_flops,
    layer_counts,
    maskable_parameters,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_cnn(seed: int = 0) -> nn.Sequential:
    """conv(3->8) bn conv(8->16, stride 2) bn conv(16->16) pool linear(16->32) linear(32->10)."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.3)
    return net


def batches(n: int = 4, size: int = 20, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 8, 8, generator=gen), torch.randint(0, 10, (size,), generator=gen))
        for _ in range(n)
    ]


def test_maskable_weights_skip_first_layer_classifier_biases_and_norms() -> None:
    net = tiny_cnn()
    assert list(maskable_parameters(net)) == ["3.weight", "6.weight", "10.weight"]
    everything = maskable_parameters(net, dense_first_layer=False, dense_classifier=False)
    assert list(everything) == ["0.weight", "3.weight", "6.weight", "10.weight", "12.weight"]


@pytest.mark.parametrize("density", [0.5, 0.1, 0.05, 0.02])
@pytest.mark.parametrize("distribution", ["uniform", "erk", "er"])
def test_realised_density_is_exact_for_every_method(distribution: str, density: float) -> None:
    for method in METHODS[1:]:
        for global_threshold in (False, True) if method in ("magnitude", "snip") else (False,):
            net = tiny_cnn()
            cfg = SparsityConfig(
                method=method,
                distribution=distribution,
                density=density,
                global_threshold=global_threshold,
                synflow_iterations=5,
                grasp_samples_per_class=2,
            )
            masking = Masking(net, cfg, total_steps=10, generator_seed=0)
            masking.init_masks(batches(), F.cross_entropy)
            total = sum(p.numel() for p in masking.params.values())
            kept = sum(int(m.sum()) for m in masking.masks.values())
            assert kept == math.floor(density * total + 0.5), (method, global_threshold)
            report = masking.report()
            assert report["global_density"] == pytest.approx(kept / total, abs=0)
            assert abs(report["global_density"] - density) <= 0.5 / total
            if not global_threshold:
                shapes = {n: p.shape for n, p in masking.params.items()}
                want = layer_counts(shapes, density, distribution)
                assert {n: int(m.sum()) for n, m in masking.masks.items()} == want
            for n, m in masking.masks.items():
                assert bool((masking.params[n][~m] == 0).all())


def test_dense_method_changes_nothing() -> None:
    net = tiny_cnn()
    before = [p.clone() for p in net.parameters()]
    masking = Masking(net, SparsityConfig(method="dense"), total_steps=10)
    masking.init_masks(batches(), F.cross_entropy)
    assert masking.step(0) is False
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    report = masking.report()
    assert report["global_density"] == 1.0 and report["active_flops"] == report["dense_flops"]


def test_checkpoint_round_trip_restores_masks_on_a_fresh_model(tmp_path: object) -> None:
    cfg = SparsityConfig(method="set", density=0.1, update_interval=1, end_fraction=1.0)
    net = tiny_cnn()
    masking = Masking(net, cfg, total_steps=100, generator_seed=5)
    masking.init_masks(batches(), F.cross_entropy)
    for step in range(3):
        masking.step(step)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "masking": masking.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    fresh = tiny_cnn(seed=1)  # different weights: the masks must come from the checkpoint
    restored = Masking(fresh, cfg, total_steps=100, generator_seed=99)
    restored.load_state_dict(ckpt["masking"])
    for n, m in masking.masks.items():
        assert torch.equal(restored.masks[n], m)
        assert bool((restored.params[n][~m] == 0).all())  # applied to the fresh weights
    assert restored.report()["changed_last_update"] == masking.changed_last_update
    fresh.load_state_dict(ckpt["model"])
    # The generator state travels too: the next update is the same on both.
    assert masking.step(3) and restored.step(3)
    for n, m in masking.masks.items():
        assert torch.equal(restored.masks[n], m)


def test_checkpoint_of_another_method_is_refused() -> None:
    net = tiny_cnn()
    masking = Masking(net, SparsityConfig(method="set"), total_steps=10)
    masking.init_masks()
    other = Masking(tiny_cnn(), SparsityConfig(method="rigl"), total_steps=10)
    with pytest.raises(ValueError, match=r"sparse\.method='set', run has 'rigl'"):
        other.load_state_dict(masking.state_dict())
    denser = Masking(tiny_cnn(), SparsityConfig(method="set", density=0.2), total_steps=10)
    with pytest.raises(ValueError, match=r"sparse\.density=0\.1, run has 0\.2"):
        denser.load_state_dict(masking.state_dict())


def test_count_flops_by_hand() -> None:
    net = tiny_cnn()
    # 8x8 input: conv0 and the stride-1 conv6 see 8x8 / 4x4 outputs, conv3 4x4.
    dense = 8 * 3 * 9 * 64 + 16 * 8 * 9 * 16 + 16 * 16 * 9 * 16 + 16 * 32 + 32 * 10
    assert count_flops(net, (3, 8, 8)) == dense
    masks = {net[3].weight: torch.zeros(16, 8, 3, 3, dtype=torch.bool)}
    masks[net[3].weight][0, 0, 0, :2] = True  # two active weights, 16 positions each
    assert count_flops(net, (3, 8, 8), masks) == dense - 16 * 8 * 9 * 16 + 2 * 16
    by_name = {"3.weight": masks[net[3].weight]}
    assert count_flops(net, (3, 8, 8), by_name) == count_flops(net, (3, 8, 8), masks)


def test_report_counts_active_flops_and_leaves_the_model_alone() -> None:
    net = tiny_cnn()
    net.train()
    cfg = SparsityConfig(method="magnitude", density=0.1)
    masking = Masking(net, cfg, total_steps=10)
    masking.init_masks(batches(), F.cross_entropy)
    stats = net[1].running_mean.clone()
    report = masking.report()
    assert net.training and torch.equal(net[1].running_mean, stats)
    active = {n: int(m.sum()) for n, m in masking.masks.items()}
    # Maskable: conv3 (4x4 outputs), conv6 (4x4 outputs), linear 10.
    dense_part = 8 * 3 * 9 * 64 + 32 * 10
    want = dense_part + 16 * active["3.weight"] + 16 * active["6.weight"] + active["10.weight"]
    assert report["active_flops"] == want
    assert report["dense_flops"] == count_flops(net, (3, 8, 8))
    assert set(report["layer_density"]) == set(active)
    assert report["overall_density"] > report["global_density"]


def test_plain_torch_optimizer_gets_masks_from_step() -> None:
    net = tiny_cnn()
    masking = Masking(net, SparsityConfig(method="random", density=0.2), total_steps=10)
    masking.init_masks()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    masking.attach(opt)  # no set_masks: Masking.step applies the masks itself
    x, y = batches(1)[0]
    F.cross_entropy(net(x), y).backward()
    opt.step()
    assert any(bool((masking.params[n][~m] != 0).any()) for n, m in masking.masks.items())
    masking.step(0)
    assert all(bool((masking.params[n][~m] == 0).all()) for n, m in masking.masks.items())


def test_resnet32_layer_densities_are_erk() -> None:
    net = create_model("resnet32", num_classes=10)
    masking = Masking(net, SparsityConfig(method="set", density=0.1), total_steps=10)
    masking.init_masks()
    dens = masking.report()["layer_density"]
    assert "conv1.weight" not in dens and "fc.weight" not in dens  # dense by default
    # ERK: the small 1x1 shortcuts and the 32-channel stage are denser than stage 3.
    assert dens["layer1.0.conv1.weight"] > dens["layer3.1.conv1.weight"]
    assert dens["layer3.0.shortcut.0.weight"] > dens["layer3.1.conv1.weight"]
    assert masking.report()["global_density"] == pytest.approx(0.1, abs=1e-6)
