"""Two gloo processes: masks are identical on every rank after init and after each update,
although each rank sees different data and seeds its own generator differently."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from zosam.optim import FirstOrder, make_closure
from zosam.sparse import Masking, SparsityConfig

pytestmark = pytest.mark.distributed

WORLD = 2


def _model() -> nn.Sequential:
    gen = torch.Generator().manual_seed(0)  # the same initial weights on every rank
    net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return net


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t)
    return out


def _same_everywhere(masking: Masking) -> bool:
    flat = torch.cat([m.flatten().to(torch.uint8) for m in masking.masks.values()])
    first, *rest = _gather(flat)
    return all(torch.equal(first, r) for r in rest)


def _rank_data(rank: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    x = torch.randn(n, 12, generator=gen)
    return x, x[:, :4].argmax(1)


def _dynamic(rank: int, method: str) -> None:
    model = _model()
    x, y = _rank_data(rank, 64)
    cfg = SparsityConfig(
        method=method,
        density=0.2,
        update_interval=1,
        drop_schedule="constant",
        end_fraction=1.0,
        dense_first_layer=False,
        dense_classifier=False,
    )
    masking = Masking(model, cfg, total_steps=50, generator_seed=rank)  # differs per rank
    masking.init_masks()
    assert _same_everywhere(masking), f"{method}: masks differ after init"
    opt = FirstOrder(model.parameters(), torch.optim.SGD, model=model, lr=0.05, momentum=0.9)
    masking.attach(opt)
    grads_differ = False
    for step in range(10):
        opt.step(make_closure(model, F.cross_entropy, x[step * 6 :][:6], y[step * 6 :][:6]))
        g = model[2].weight.grad.flatten().clone()
        grads_differ |= not all(torch.equal(g, o) for o in _gather(g))
        assert masking.step(step), "no mask change"
        assert _same_everywhere(masking), f"{method}: masks differ after update {step}"
    # Without DDP the ranks' gradients differ, so their local RigL decisions would too.
    assert grads_differ


def _static(rank: int) -> None:
    model = _model()
    x, y = _rank_data(rank, 16)
    cfg = SparsityConfig(method="snip", density=0.1, dense_first_layer=False)
    masking = Masking(model, cfg, total_steps=10, generator_seed=rank)
    masking.init_masks([(x, y)], F.cross_entropy)  # scores all-reduced, masks broadcast
    assert _same_everywhere(masking), "snip: masks differ across ranks"
    assert not masking.step(0)


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for method in ("rigl", "set", "mest", "dsr"):
            _dynamic(rank, method)
        _static(rank)
    finally:
        dist.destroy_process_group()


def test_masks_match_across_two_gloo_ranks(tmp_path: Path) -> None:
    # One spawn for all hosts: starting the processes is the expensive part.
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)
