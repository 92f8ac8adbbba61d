"""The closure an optimizer's ``step`` calls: ``closure(fraction=1.0, *, indices=None,
reduction="mean")`` runs a forward pass and returns the loss, never calling backward.

:func:`make_closure` builds the standard one (a :class:`BatchClosure`); an optimizer checks
with :func:`_accepts` that a user's closure takes the keywords it needs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from zosam.validate import choice

Closure = Callable[..., Tensor]


class BatchClosure:
    """The closure :func:`make_closure` returns: ``loss_fn(model(x), y)`` on one batch.

    ``closure(fraction=1.0, *, indices=None, reduction="mean")`` returns the loss; it never
    calls backward. ``inputs`` / ``targets`` are the batch and :meth:`rebind` the same
    closure on other tensors of that shape (the static input buffers of a CUDA graph).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Tensor], inputs: Tensor, targets: Tensor, *,
                 autocast: torch.autocast | None = None,
                 record: Callable[[Tensor, Tensor], None] | None = None) -> None:
        self.model, self.loss_fn, self.inputs, self.targets = model, loss_fn, inputs, targets
        self.autocast, self.record = autocast, record

    def rebind(self, inputs: Tensor, targets: Tensor) -> BatchClosure:
        """This closure on ``inputs`` / ``targets`` (without ``record``)."""
        return BatchClosure(self.model, self.loss_fn, inputs, targets, autocast=self.autocast)

    def __call__(self, fraction: float = 1.0, *, indices: Tensor | None = None, reduction: str = "mean") -> Tensor:
        choice("reduction", reduction, ("mean", "none"))
        inputs, targets = self.inputs, self.targets
        if indices is not None:
            if fraction < 1.0:
                raise ValueError("closure: pass either fraction < 1 or indices, not both")
            x, y = inputs[indices], targets[indices]
        else:
            n = inputs.shape[0] if fraction >= 1.0 else max(1, math.ceil(fraction * inputs.shape[0]))
            x, y = (inputs, targets) if n == inputs.shape[0] else (inputs[:n], targets[:n])
        kwargs = {} if reduction == "mean" else {"reduction": reduction}
        if self.autocast is None:
            out = self.model(x)
        else:
            with self.autocast:
                out = self.model(x)
        if self.record is not None and indices is None and fraction >= 1.0 and torch.is_grad_enabled():
            self.record(out.detach(), y)
        if self.autocast is None:
            return self.loss_fn(out, y, **kwargs)
        with self.autocast:
            return self.loss_fn(out, y, **kwargs)


def make_closure(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    autocast: torch.autocast | None = None,
    record: Callable[[Tensor, Tensor], None] | None = None,
) -> BatchClosure:
    """Build the standard closure for :meth:`PerturbationOptimizer.step` (a :class:`BatchClosure`).

    ``closure(fraction=1.0, *, indices=None, reduction="mean")`` runs
    ``loss_fn(model(x), y)`` and returns the loss; it never calls backward.

    - ``fraction < 1``: only the first ``ceil(fraction * B)`` samples (the batch is
      already shuffled, so a prefix is a random subset).
    - ``indices``: only the samples ``inputs[indices]`` (ESAM's data selection); not
      combinable with ``fraction < 1``.
    - ``reduction="none"``: per-sample losses (a length-n tensor) from
      ``loss_fn(out, y, reduction="none")``, so ``loss_fn`` must accept ``reduction=``
      as ``F.cross_entropy`` does; ``"mean"`` calls ``loss_fn(out, y)`` unchanged.

    ``autocast``, if given (e.g. ``torch.autocast("cuda", dtype=torch.float16)``), wraps
    the forward pass.

    ``record``, if given, is called as ``record(outputs, targets)`` after every pass over
    the whole batch with autograd on (any ``reduction``), e.g. to count correct
    predictions; the last such pass of a step is the one an optimizer trains on.
    """
    return BatchClosure(model, loss_fn, inputs, targets, autocast=autocast, record=record)


def _accepts(fn: Callable[..., Any], keyword: str) -> bool:
    params = inspect.signature(fn).parameters
    return keyword in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
