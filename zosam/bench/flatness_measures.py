"""Flatness measures, pure functions of a model, a loss and batches: the top Hessian
eigenvalue (power iteration with Hessian-vector products), the SAM-loss gap and the
variance of mini-batch gradients, each restricted to the active weights when masks are given."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

Batches = Sequence[tuple[Tensor, Tensor]]


def _batch_loss(model: nn.Module, loss_fn: Callable[..., Tensor], batches: Batches) -> Tensor:
    """The mean loss over all samples of ``batches`` (batches weighted by their size)."""
    n = sum(len(y) for _, y in batches)
    return sum(loss_fn(model(x), y) * (len(y) / n) for x, y in batches)  # type: ignore[return-value]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b, strict=True)))


def _norm(a: Sequence[Tensor]) -> float:
    return math.sqrt(_dot(a, a))


def _apply(vs: list[Tensor], masks: Sequence[Tensor | None]) -> list[Tensor]:
    return [v if m is None else v * m for v, m in zip(vs, masks, strict=True)]


def hessian_vector_product(model: nn.Module, loss_fn: Callable[..., Tensor], batches: Batches,
                           params: Sequence[Tensor], v: Sequence[Tensor]) -> list[Tensor]:
    """``H v`` of the mean loss over ``batches`` (double backward, one batch at a time)."""
    n = sum(len(y) for _, y in batches)
    out = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        loss = loss_fn(model(x), y) * (len(y) / n)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=list(v))
        for o, h in zip(out, hv, strict=True):
            o.add_(h.detach())
    return out


def _power_iteration(hvp: Callable[[list[Tensor]], list[Tensor]], v: list[Tensor], iters: int, tol: float,
                     shift: float = 0.0) -> float:
    """Dominant eigenvalue of ``H - shift I`` (``hvp`` gives ``H v``), by power iteration from ``v``."""
    nv = _norm(v)
    v = [t / nv for t in v]
    lam = 0.0
    for i in range(iters):
        hv = hvp(v)
        if shift:
            hv = [h - shift * t for h, t in zip(hv, v, strict=True)]
        new = _dot(v, hv)  # Rayleigh quotient (||v|| = 1)
        nh = _norm(hv)
        if nh == 0:
            return 0.0
        v = [t / nh for t in hv]
        if i > 0 and abs(new - lam) <= tol * max(abs(new), 1e-12):
            return new
        lam = new
    return lam


def top_hessian_eigenvalue(model: nn.Module, loss_fn: Callable[..., Tensor], batches: Batches, *,
                           params: Sequence[Tensor] | None = None, masks: Sequence[Tensor | None] | None = None,
                           iters: int = 20, tol: float = 1e-3, seed: int = 0) -> float:
    """The largest Hessian eigenvalue of the loss over ``batches``, by power iteration with HVPs.

    Power iteration finds the eigenvalue of largest magnitude; when that one is negative
    (a saddle region), a second run on ``H - lambda_neg I`` finds the largest one. Restricted
    to the active weights when ``masks`` are given (the Hessian of the loss as a function
    of the active weights: ``M H M``). Each run stops when the Rayleigh quotient changes by
    less than ``tol`` relative; start vectors come from a generator seeded with ``seed``.
    """
    params = list(params if params is not None else (p for p in model.parameters() if p.requires_grad))
    masks = list(masks) if masks is not None else [None] * len(params)
    gen = torch.Generator().manual_seed(seed)

    def start() -> list[Tensor]:
        return _apply([torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params], masks)

    def hvp(v: list[Tensor]) -> list[Tensor]:
        return _apply(hessian_vector_product(model, loss_fn, batches, params, v), masks)

    lam = _power_iteration(hvp, start(), iters, tol)
    if lam < 0:
        lam = _power_iteration(hvp, start(), iters, tol, shift=lam) + lam
    return lam


def sam_gap(model: nn.Module, loss_fn: Callable[..., Tensor], batches: Batches, rho: float, *,
            params: Sequence[Tensor] | None = None, masks: Sequence[Tensor | None] | None = None) -> float:
    """``L(w + rho g / ||g||) - L(w)`` on ``batches``, g the (masked) gradient at w; w restored exactly."""
    params = list(params if params is not None else (p for p in model.parameters() if p.requires_grad))
    masks = list(masks) if masks is not None else [None] * len(params)
    loss0 = _batch_loss(model, loss_fn, batches)
    g = _apply([t.detach() for t in torch.autograd.grad(loss0, params)], masks)
    ng = _norm(g)
    if ng == 0:
        return 0.0
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, t in zip(params, g, strict=True):
            p.add_(t, alpha=rho / ng)
        loss1 = float(_batch_loss(model, loss_fn, batches))
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    return loss1 - float(loss0.detach())


def gradient_variance(model: nn.Module, loss_fn: Callable[..., Tensor], batches: Batches, *,
                      params: Sequence[Tensor] | None = None,
                      masks: Sequence[Tensor | None] | None = None) -> float:
    """Trace of the covariance of the mini-batch gradients: ``sum_k ||g_k - mean g||^2 / (K - 1)``."""
    params = list(params if params is not None else (p for p in model.parameters() if p.requires_grad))
    masks = list(masks) if masks is not None else [None] * len(params)
    if len(batches) < 2:
        raise ValueError("gradient_variance needs at least 2 batches")
    grads = []
    for x, y in batches:
        g = torch.autograd.grad(loss_fn(model(x), y), params)
        grads.append(torch.cat([t.detach().flatten() for t in _apply(list(g), masks)]))
    stacked = torch.stack(grads)
    return float((stacked - stacked.mean(0)).pow(2).sum() / (len(grads) - 1))
