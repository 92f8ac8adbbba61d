"""ZO-SAM under torch.distributed (gloo, 2 CPU processes) equals one process on the whole batch,
with Gaussian and with guided directions, and with the optimizer (which moves the parameters
into its flat buffer) built after or before the DDP wrap (one spawn for all: starting the
processes is the cost)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from zosam.optim import ZOSAM, make_closure

pytestmark = pytest.mark.distributed

STEPS, BATCH = 4, 16
# "gaussian-before": the optimizer built before the DDP wrap, as the engine does; the others after it.
VARIANTS = ("gaussian", "guided", "gaussian-before")


def _model() -> nn.Module:  # no BatchNorm: per-rank batch statistics would differ
    # float64: the ranks and the single process differ only in reduction order, which
    # float64 rounds far below the test's tolerance on every CPU (float32 does not).
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g))
            for _ in range(STEPS)]


def _train(model: nn.Module, rank: int, world: int, variant: str, wrap: bool = False) -> None:
    # Guided: the surrogates (the DDP-averaged applied gradient and the momentum built from
    # it) must be the same on every rank, or the ranks would perturb differently.
    opt = ZOSAM(model.parameters(), torch.optim.SGD, model=model, q=2, mu=1e-2, seed=5, lr=0.2, momentum=0.9,
                directions=variant.split("-")[0], guide="gradient+momentum", alpha=0.3)
    net = DDP(model) if wrap else model
    half = BATCH // world
    for x, y in _batches():
        xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        opt.step(make_closure(net, F.cross_entropy, xs, ys))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for variant in VARIANTS:
            model = _model()
            if variant.endswith("before"):
                _train(model, rank, world, variant, wrap=True)
            else:
                _train(DDP(model), rank, world, variant)
            torch.save([p.detach() for p in model.parameters()], f"{out}/{variant}{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for variant in VARIANTS:
        r0 = torch.load(tmp_path / f"{variant}0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"{variant}1.pt", weights_only=True)
        single = _model()
        _train(single, 0, 1, variant)
        for a, b, s in zip(r0, r1, single.parameters(), strict=True):
            assert torch.equal(a, b)  # every rank perturbs and updates identically
            torch.testing.assert_close(a, s.detach(), rtol=1e-10, atol=1e-12)
        assert not torch.equal(r0[0], _model()[0].weight)  # it trained
