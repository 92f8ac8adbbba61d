"""Pruning at init: SNIP, GraSP and SynFlow rank a planted important weight above a planted
useless one; SynFlow keeps every ResNet-32 layer connected at 98 % sparsity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zosam.models import create_model
from zosam.sparse import Masking, SparsityConfig
from zosam.sparse.pruners import (
    PruneContext,
    SynFlow,
    class_balanced_batch,
    grasp_scores,
    snip_scores,
    synflow_scores,
)

IMPORTANT = (0, 0)  # first-layer weight from the informative input 0 to hidden unit 0
USELESS = (3, 3)  # from input 3 (always zero) to hidden unit 3 (no outgoing weight)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def planted() -> nn.Sequential:
    """y = [x0 > 0]: hidden unit 0 = relu(2 x0) votes for class 1 with weight +-2.

    The useless weight is just as large (so magnitude pruning cannot tell them apart) but
    its input is always zero and its hidden unit reaches no output.
    """
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_((torch.rand(p.shape, generator=gen) - 0.5) * 0.2)
        net[0].weight[IMPORTANT] = 2.0
        net[2].weight[1, 0], net[2].weight[0, 0] = 2.0, -2.0
        net[0].weight[USELESS] = 2.0
        net[2].weight[:, 3] = 0.0
    return net


def planted_data(n: int = 100, batch: int = 25) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=gen)
    x[:, 3] = 0.0
    y = (x[:, 0] > 0).long()
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def context(net: nn.Module, **cfg: object) -> PruneContext:
    config = SparsityConfig(
        method="snip", density=0.5, dense_first_layer=False, dense_classifier=False, **cfg
    )
    params = {"0.weight": net[0].weight, "2.weight": net[2].weight}
    return PruneContext(
        model=net,
        params=params,
        counts={"0.weight": 8, "2.weight": 4},
        config=config,
        generator=torch.Generator().manual_seed(0),
        batches=iter(planted_data()),
        loss_fn=F.cross_entropy,
        input_shape=(4,),
    )


@pytest.mark.parametrize("scorer", [snip_scores, grasp_scores, synflow_scores])
def test_planted_important_weight_outranks_useless_one(scorer: object) -> None:
    net = planted()
    scores = scorer(context(net))["0.weight"]
    assert scores[IMPORTANT] == scores.max()  # the most important weight of its layer
    assert scores[IMPORTANT] > scores[USELESS]
    assert scores[USELESS] == 0  # no gradient and no flow through it
    assert net[0].weight[USELESS].abs() >= net[0].weight[IMPORTANT].abs()  # magnitude ties


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_pruning_keeps_the_important_weight_and_drops_the_useless_one(method: str) -> None:
    net = planted()
    cfg = SparsityConfig(
        method=method,
        density=0.25,
        distribution="uniform",
        dense_first_layer=False,
        dense_classifier=False,
        synflow_iterations=10,
    )
    masking = Masking(net, cfg, total_steps=10, input_shape=(4,))
    masking.init_masks(planted_data(), F.cross_entropy)
    mask = masking.masks["0.weight"]
    assert bool(mask[IMPORTANT]) and not bool(mask[USELESS])
    assert net[0].weight[USELESS] == 0 and net[0].weight[IMPORTANT] == 2.0


def test_data_pruners_leave_batchnorm_statistics_and_gradients_alone() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(12, 3, 8, 8, generator=gen), torch.arange(12) % 3) for _ in range(4)]
    stats = {n: b.clone() for n, b in net.named_buffers()}
    net.eval()
    for method in ("snip", "grasp"):
        cfg = SparsityConfig(method=method, density=0.3, grasp_samples_per_class=4, prune_batches=2)
        Masking(net, cfg, total_steps=10).init_masks(data, F.cross_entropy)
    assert all(torch.equal(b, stats[n]) for n, b in net.named_buffers())
    assert all(p.grad is None for p in net.parameters())
    assert not net.training


def test_class_balanced_batch_takes_k_per_class() -> None:
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 2, generator=gen), torch.randint(0, 4, (16,), generator=gen))
            for _ in range(20)]  # fmt: skip
    x, y = class_balanced_batch(iter(data), per_class=10, num_classes=4)
    assert x.shape == (40, 2)
    assert torch.equal(torch.bincount(y), torch.full((4,), 10))
    # Samples are the real ones, matched to their labels.
    pool = {tuple(v.tolist()): int(c) for xb, yb in data for v, c in zip(xb, yb, strict=True)}
    assert all(pool[tuple(v.tolist())] == int(c) for v, c in zip(x, y, strict=True))


@pytest.mark.parametrize("global_threshold", [False, True])
def test_synflow_keeps_every_resnet32_layer_connected_at_98_percent(global_threshold: bool) -> None:
    # Full-width ResNet-32 (1.86 M maskable weights), the default 100 rounds; an 8x8
    # input keeps it fast on a CPU (the 32x32 run is the device check in the benchmark).
    net = create_model("resnet32", num_classes=10)
    shape = (3, 8, 8)
    cfg = SparsityConfig(method="synflow", density=0.02, global_threshold=global_threshold)
    masking = Masking(net, cfg, total_steps=10, input_shape=shape)
    masking.init_masks()
    assert masking.report()["global_density"] == pytest.approx(0.02, abs=1e-6)
    # Flow through each layer = sum of its SynFlow scores on the pruned net: positive iff
    # some input-output path crosses the layer.
    flow = SynFlow(net, list(masking.params), shape).scores(masking.masks)
    dead = [n for n, s in flow.items() if not s.sum() > 0]
    assert not dead, f"disconnected layers: {dead}"
    if global_threshold:  # a global threshold really redistributes across layers
        dens = masking.report()["layer_density"].values()
        assert max(dens) / min(dens) > 5


def test_magnitude_global_threshold_ranks_across_layers() -> None:
    def net() -> nn.Sequential:
        m = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False))
        with torch.no_grad():
            m[0].weight.fill_(1.0)
            m[1].weight.copy_(torch.linspace(0.01, 0.5, 100).view(10, 10))
        return m

    cfg = dict(method="magnitude", density=0.5, dense_first_layer=False, dense_classifier=False)
    glob = Masking(net(), SparsityConfig(global_threshold=True, **cfg), total_steps=1)
    glob.init_masks()
    # The 100 kept weights are layer 1's best (never empty a layer) and 99 of layer 0's.
    assert int(glob.masks["0.weight"].sum()) == 99 and int(glob.masks["1.weight"].sum()) == 1
    assert bool(glob.masks["1.weight"].flatten()[-1])
    per_layer = Masking(net(), SparsityConfig(distribution="uniform", **cfg), total_steps=1)
    per_layer.init_masks()
    assert [int(m.sum()) for m in per_layer.masks.values()] == [50, 50]
    assert bool(per_layer.masks["1.weight"].flatten()[50:].all())  # layer 1's top half
