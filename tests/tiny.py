"""Tiny problems for the optimizer tests (an MLP and batches; float64 least squares), from explicit generators."""

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


def train_steps(opt_factory, steps: int, model: nn.Module | None = None, opt=None, start: int = 0):
    """``steps`` optimizer steps of a fresh ``mlp()`` (or ``model``) on ``batch(100 + i)``."""
    import torch.nn.functional as F

    from zosam.optim import make_closure

    model = model or mlp()
    opt = opt or opt_factory(model)
    for i in range(start, start + steps):
        x, y = batch(100 + i)
        opt.step(make_closure(model, F.cross_entropy, x, y))
    return model, opt


def resumed_halfway(opt_factory, steps: int):
    """(uninterrupted (model, optimizer), resumed (model, optimizer), checkpoint): ``steps`` steps straight through, and
    ``steps // 2`` steps saved through ``torch.save`` and resumed into a fresh model for the rest."""
    import io

    full, full_opt = train_steps(opt_factory, steps)
    half, half_opt = train_steps(opt_factory, steps // 2)
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": half_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = mlp(seed=99)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = opt_factory(resumed)
    resumed_opt.load_state_dict(ckpt["opt"])
    train_steps(opt_factory, steps - steps // 2, resumed, resumed_opt, start=steps // 2)
    return (full, full_opt), (resumed, resumed_opt), ckpt


class LeastSquares:
    """L(w) = mean_i (x_i . w - y_i)^2 in float64; the closure records the weights it sees."""

    def __init__(self, n: int = 8, d: int = 6, seed: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, d, generator=g, dtype=torch.float64)
        self.y = torch.randn(n, generator=g, dtype=torch.float64)
        self.model = nn.Linear(d, 1, bias=False).double()
        with torch.no_grad():
            self.model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
        self.seen: list[tuple[torch.Tensor, bool, int]] = []  # (weights, autograd on, samples)

    def w(self) -> torch.Tensor:
        return self.model.weight.detach().view(-1).clone()

    def closure(self, fraction: float = 1.0, *, indices=None, reduction: str = "mean") -> torch.Tensor:
        X, y = (self.X, self.y) if indices is None else (self.X[indices], self.y[indices])
        self.seen.append((self.w(), torch.is_grad_enabled(), len(y)))
        r = (self.model(X).view(-1) - y) ** 2
        return r if reduction == "none" else r.mean()

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        return ((self.X @ w - self.y) ** 2).mean()

    def grad(self, w: torch.Tensor, idx=None) -> torch.Tensor:
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        return 2 / len(y) * X.T @ (X @ w - y)

    def per_sample(self, w: torch.Tensor) -> torch.Tensor:
        return (self.X @ w - self.y) ** 2

    def make(self, cls, **kw):
        return cls(self.model.parameters(), torch.optim.SGD, model=self.model, **kw)
