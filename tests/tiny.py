"""A tiny MLP and batches for the optimizer tests, initialised from explicit generators."""

from __future__ import annotations

import torch
from torch import nn


def mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    """6 -> 8 (-> BatchNorm) -> ReLU -> 3, weights N(0, 0.25) from a generator seeded with ``seed``."""
    layers: list[nn.Module] = [nn.Linear(6, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.ReLU(), nn.Linear(8, 3)]
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(seed)  # explicit init: the global RNG is never seeded
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
