"""Diagnostics of a zeroth-order step: how well the estimate points and what it ascends.

Used by the engine for the first ``eval.diagnostics_steps`` steps of a run; the passes run
here are outside the optimizer's accounting and leave weights, BatchNorm statistics, the
step count and the pass counts as they were. These read values back to the host (they are
diagnostics, not part of a step).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zosam.optim.base import PerturbationOptimizer
from zosam.optim.closure import Closure
from zosam.optim.flat import wide
from zosam.optim.zosam import ZOSAM


def _dot(a: list[Tensor | None], b: list[Tensor | None]) -> float:
    terms = [(wide(x) * wide(y)).sum() for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not terms:
        return 0.0
    return float(torch.stack([t.to(terms[0].device) for t in terms]).sum())


def zo_diagnostics(opt: PerturbationOptimizer, closure: Closure) -> dict[str, float]:
    """``diag_cosine``: cosine of the ZO estimate ``g_hat`` with the true mini-batch gradient
    (both over the active weights); ``diag_sharpness_gap``: ``L(w + rho g_hat / ||g_hat||) -
    L(w)``. Empty for optimizers other than ZO-SAM and when the
    estimate is zero or not finite."""
    if not isinstance(opt, ZOSAM):
        return {}
    g_hat = opt.estimate_gradient(closure)
    if g_hat is None:
        return {}
    params = opt.params()
    with opt.frozen_batchnorm():
        loss0 = closure()
        grads = torch.autograd.grad(loss0, params, allow_unused=True)
    # Like with like: the estimate lives on the active weights, so is the gradient it is
    # compared with (pruned weights' gradients cannot move the weights).
    masked = [None if g is None else (g * opt.masks[p] if p in opt.masks else g)
              for p, g in zip(params, grads, strict=True)]
    dot = _dot(g_hat, masked)
    na = math.sqrt(max(_dot(g_hat, g_hat), 0.0))
    nb = math.sqrt(max(_dot(masked, masked), 0.0))
    saved = [p.detach().clone() for p in params]
    with torch.no_grad(), opt.frozen_batchnorm():
        for p, g in zip(params, g_hat, strict=True):
            p.add_(g, alpha=opt.rho / na)
        loss_e = float(closure())
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    return {"diag_cosine": dot / (na * nb + 1e-30), "diag_sharpness_gap": loss_e - float(loss0.detach())}


__all__ = ["zo_diagnostics"]
