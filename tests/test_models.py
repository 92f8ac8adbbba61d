"""Every registered model builds and runs; parameter counts of the reference ResNets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zosam.models import MODELS, create_model


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("resnet20", {}, (2, 3, 32, 32)),
        ("resnet32", {}, (2, 3, 32, 32)),
        ("resnet50", {"variant": "cifar"}, (2, 3, 8, 8)),
        ("resnet50", {"variant": "imagenet"}, (2, 3, 32, 32)),
        ("deit_tiny", {"img_size": 32, "patch_size": 8}, (2, 3, 32, 32)),
        ("deit_small", {"img_size": 32, "patch_size": 8}, (2, 3, 32, 32)),
        ("tiny_cnn", {}, (2, 3, 16, 16)),
        ("tiny_cnn", {"bn": False, "in_channels": 1}, (2, 1, 16, 16)),
        ("mlp", {"in_features": 3 * 8 * 8, "hidden": [32, 16]}, (2, 3, 8, 8)),
    ],
)
def test_builds_and_runs(name: str, kwargs: dict, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, **kwargs)
    model.train()
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], 7) and torch.isfinite(out).all()
    out.sum().backward()  # every weight gets a gradient
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_registry_holds_the_models() -> None:
    for name in ("resnet20", "resnet32", "resnet50", "deit_tiny", "deit_small", "tiny_cnn",
                 "mlp"):
        assert name in MODELS
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        create_model("vgg", 10)


# Width 16 is the original ResNet-32 (0.46 M with the paper's zero-padding shortcuts; the
# projection shortcuts used here add 6.9 k weights).
@pytest.mark.parametrize(("width", "expected"), [(32, 1_860_522), (16, 466_906)])
def test_resnet32_parameter_count(width: int, expected: int) -> None:
    assert n_params(create_model("resnet32", 10, width=width)) == expected


def test_resnet50_parameter_counts() -> None:
    # torchvision's ResNet-50 with 1000 classes has 25,557,032 weights; the CIFAR variant
    # differs only in the stem (3x3x3x64 instead of 7x7x3x64) and the classifier.
    assert n_params(create_model("resnet50", 1000, variant="imagenet")) == 25_557_032
    cifar = n_params(create_model("resnet50", 1000, variant="cifar"))
    assert cifar == 25_557_032 - (7 * 7 - 3 * 3) * 3 * 64


def test_deit_sizes_and_no_pretrained_weights() -> None:
    tiny = create_model("deit_tiny", 1000)
    assert abs(n_params(tiny) - 5.72e6) / 5.72e6 < 0.01
    # Two builds with different seeds differ: weights are random, never loaded.
    torch.manual_seed(1)
    a = create_model("deit_tiny", 10, img_size=32, patch_size=8)
    torch.manual_seed(2)
    b = create_model("deit_tiny", 10, img_size=32, patch_size=8)
    assert not torch.equal(a.patch_embed.proj.weight, b.patch_embed.proj.weight)


def test_tiny_cnn_bn_option() -> None:
    with_bn = create_model("tiny_cnn", 10)
    without = create_model("tiny_cnn", 10, bn=False)
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in with_bn.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in without.modules())
    # Without BatchNorm the output of a sample does not depend on the rest of the batch.
    without.train()
    x = torch.randn(6, 3, 16, 16)
    torch.testing.assert_close(without(x)[:3], without(x[:3]))


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("resnet50", {"variant": "wide"}, "model.variant='wide' is invalid"),
        ("deit_tiny", {"img_size": 30, "patch_size": 8}, "model.patch_size=8 is invalid"),
        ("tiny_cnn", {"width": 0}, "model.width=0 is invalid"),
    ],
)
def test_argument_errors(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model(name, 10, **kwargs)


def test_deit_drop_path_acts_in_training_only() -> None:
    from timm.layers import DropPath

    model = create_model("deit_tiny", 5, img_size=32, patch_size=8, drop_path_rate=0.3)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.3)  # linear up to the configured rate, as timm/DeiT
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        a = model(x)
        b = model(x)  # other drop-path draws
    assert not torch.equal(a, b)
