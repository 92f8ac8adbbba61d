"""Pruning at initialisation (static hosts): score every maskable weight, keep the top.

Each pruner in ``PRUNERS`` maps a :class:`PruneContext` to boolean masks. Scores are
"higher = more important"; :meth:`PruneContext.select` keeps either each layer's target
count (the distribution's layer densities) or the global top-k (``global_threshold``).
A global threshold still keeps every layer's best weight, so no layer is emptied (at 98 %
sparsity global SynFlow would otherwise empty a ResNet-32 1x1 shortcut: the residual
branch's two convs carry far more flow).

- ``random``: uniform scores from the context's generator.
- ``magnitude``: ``|w|``.
- ``snip`` (Lee et al. 2019): ``|dL/dc|`` for a multiplicative mask ``c`` at ``c = 1``,
  which is ``|w * dL/dw|``; the gradient is summed over ``prune_batches`` batches.
- ``grasp`` (Wang et al. 2020): GraSP scores ``S = -w * Hg`` (H the Hessian, g the
  gradient, on a class-balanced batch, logits divided by a temperature) and removes the
  *largest* S, i.e. it keeps the weights whose removal would most reduce the gradient
  norm. Here the importance is ``-S = w * Hg``. ``Hg`` is a Hessian-gradient product by
  double backprop: ``Hg = d/dw (g_fixed . dL/dw)``.
- ``synflow`` (Tanaka et al. 2020): data-free. With every parameter and buffer replaced
  by its absolute value, the model in eval mode and an all-ones input,
  ``R = sum(f(1))`` and the score is ``w * dR/dw``. Pruning is iterative: round i of n
  keeps ``density ** (i / n)``, which avoids layer collapse. It runs on a float64 copy
  of the model (R of a deep net overflows float32).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from zosam.sparse.config import SparsityConfig
from zosam.sparse.masks import all_reduce_mean, global_topk_masks, topk_mask
from zosam.sparse.methods import PRUNERS

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class PruneContext:
    """Everything a pruner needs.

    Attributes:
        model: the model (its weights are left as they were).
        params: ``{name: weight}`` of the maskable weights.
        counts: per-layer target counts (their sum is the global target).
        config: the sparsity config.
        generator: the masking's dedicated CPU generator.
        batches: an iterator of ``(inputs, targets)`` (``None`` for data-free use).
        loss_fn: ``loss_fn(logits, targets)``, for data-dependent pruners.
        input_shape: one sample's shape (for SynFlow's all-ones input).
    """

    model: nn.Module
    params: dict[str, nn.Parameter]
    counts: dict[str, int]
    config: SparsityConfig
    generator: torch.Generator
    batches: Iterator[Batch] | None = None
    loss_fn: LossFn | None = None
    input_shape: tuple[int, ...] | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def select(self, scores: Mapping[str, Tensor], power: float = 1.0) -> dict[str, Tensor]:
        """Keep the top scores: per layer at ``counts`` or globally at their sum.

        ``power`` in (0, 1] scales the kept densities as ``d ** power`` (SynFlow's
        intermediate rounds); ``power = 1`` keeps exactly the target counts.
        """
        if self.config.global_threshold:
            numel = sum(s.numel() for s in scores.values())
            k = self.total if power == 1.0 else _scaled(self.total, numel, power)
            return global_topk_masks(scores, k, keep_one_per_layer=True)
        return {
            n: topk_mask(
                s, self.counts[n] if power == 1.0 else _scaled(self.counts[n], s.numel(), power)
            )
            for n, s in scores.items()
        }

    def next_batch(self, what: str) -> Batch:
        if self.batches is None or self.loss_fn is None:
            raise ValueError(f"sparse.method={what!r} needs batches and a loss_fn in init_masks")
        try:
            return next(self.batches)
        except StopIteration:
            raise ValueError(f"sparse.method={what!r}: the batches ran out") from None


def _scaled(count: int, numel: int, power: float) -> int:
    """Count at density ``(count / numel) ** power``, never below the final count."""
    return max(count, min(numel, round(numel * (count / numel) ** power)))


@contextmanager
def _scratch(model: nn.Module) -> Iterator[None]:
    """Run passes without side effects: buffers (BN statistics), grads and mode restored."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    grads = {p: p.grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        for p, g in grads.items():
            p.grad = g
        for m, mode in modes.items():
            m.training = mode


@PRUNERS.register("random")
def prune_random(ctx: PruneContext) -> dict[str, Tensor]:
    scores = {
        n: torch.rand(p.shape, generator=ctx.generator).to(p.device) for n, p in ctx.params.items()
    }
    return ctx.select(scores)


@PRUNERS.register("magnitude")
def prune_magnitude(ctx: PruneContext) -> dict[str, Tensor]:
    return ctx.select({n: p.detach().abs() for n, p in ctx.params.items()})


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def snip_scores(ctx: PruneContext) -> dict[str, Tensor]:
    """``|w * dL/dw|`` with the gradient summed over ``prune_batches`` batches."""
    names = list(ctx.params)
    weights = [ctx.params[n] for n in names]
    grads = [torch.zeros_like(w) for w in weights]
    dev = _device(ctx.model)
    with _scratch(ctx.model):
        ctx.model.train()
        for _ in range(ctx.config.prune_batches):
            x, y = ctx.next_batch("snip")
            loss = ctx.loss_fn(ctx.model(x.to(dev)), y.to(dev))
            for acc, g in zip(grads, torch.autograd.grad(loss, weights), strict=True):
                acc.add_(g)
    return {n: (g * w.detach()).abs() for n, g, w in zip(names, grads, weights, strict=True)}


@PRUNERS.register("snip")
def prune_snip(ctx: PruneContext) -> dict[str, Tensor]:
    return ctx.select(all_reduce_mean(snip_scores(ctx)))


def class_balanced_batch(
    batches: Iterator[Batch], per_class: int, num_classes: int, max_batches: int = 1000
) -> Batch:
    """Take ``per_class`` samples of every class from ``batches`` (fewer if they run out).

    Stops when every class in ``range(num_classes)`` is full, after ``max_batches``
    batches, or when the iterator ends.
    """
    xs: list[list[Tensor]] = [[] for _ in range(num_classes)]
    for x, y in itertools.islice(batches, max_batches):
        for c in range(num_classes):
            need = per_class - len(xs[c])
            if need > 0:
                xs[c].extend(x[y == c][:need].unbind(0))
        if all(len(v) >= per_class for v in xs):
            break
    inputs = [t for v in xs for t in v]
    if not inputs:
        raise ValueError("sparse.method='grasp': the batches held no sample")
    targets = torch.tensor([c for c, v in enumerate(xs) for _ in v])
    return torch.stack(inputs), targets


def grasp_scores(ctx: PruneContext) -> dict[str, Tensor]:
    """GraSP importance ``w * Hg`` (= minus GraSP's score; higher = keep)."""
    names = list(ctx.params)
    weights = [ctx.params[n] for n in names]
    dev = _device(ctx.model)
    temp = ctx.config.grasp_temperature
    first = ctx.next_batch("grasp")
    with _scratch(ctx.model):
        ctx.model.train()
        with torch.no_grad():
            num_classes = ctx.model(first[0][:1].to(dev)).shape[-1]
        x, y = class_balanced_batch(
            itertools.chain([first], ctx.batches), ctx.config.grasp_samples_per_class, num_classes
        )
        x, y = x.to(dev), y.to(dev)
        g = torch.autograd.grad(ctx.loss_fn(ctx.model(x) / temp, y), weights)
        # Hg = d/dw (dL/dw . g) with g held fixed: one more backward through the graph.
        g2 = torch.autograd.grad(ctx.loss_fn(ctx.model(x) / temp, y), weights, create_graph=True)
        z = sum((a * b.detach()).sum() for a, b in zip(g2, g, strict=True))
        hg = torch.autograd.grad(z, weights)
    return {n: w.detach() * h for n, w, h in zip(names, weights, hg, strict=True)}


@PRUNERS.register("grasp")
def prune_grasp(ctx: PruneContext) -> dict[str, Tensor]:
    return ctx.select(all_reduce_mean(grasp_scores(ctx)))


class SynFlow:
    """SynFlow's linearised network: a float64 copy with ``|.|`` of every tensor, in eval mode.

    The original model is never touched.
    """

    def __init__(self, model: nn.Module, names: list[str], input_shape: tuple[int, ...]) -> None:
        self.net = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            for t in itertools.chain(self.net.parameters(), self.net.buffers()):
                if t.is_floating_point():
                    t.abs_()
        lookup = dict(self.net.named_parameters())
        self.weights = {n: lookup[n] for n in names}
        for n, p in lookup.items():
            p.requires_grad_(n in self.weights)
        self.base = {n: w.detach().clone() for n, w in self.weights.items()}
        self.ones = torch.ones((1, *input_shape), dtype=torch.float64, device=_device(self.net))

    def scores(self, masks: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``w * dR/dw`` with ``R = sum(f(1))`` at the masked absolute weights (all >= 0)."""
        with torch.no_grad():
            for n, w in self.weights.items():
                w.copy_(self.base[n] if masks is None else self.base[n] * masks[n])
        r = self.net(self.ones).sum()
        if not torch.isfinite(r):
            raise FloatingPointError("synflow: R overflowed even in float64")
        grads = torch.autograd.grad(r, list(self.weights.values()))
        return {
            n: (g * w).detach() for (n, w), g in zip(self.weights.items(), grads, strict=True)
        }


def synflow_scores(ctx: PruneContext) -> dict[str, Tensor]:
    """One SynFlow round on the unpruned model."""
    if ctx.input_shape is None:
        raise ValueError("sparse.method='synflow' needs an input shape (pass input_shape)")
    return SynFlow(ctx.model, list(ctx.params), ctx.input_shape).scores()


@PRUNERS.register("synflow")
def prune_synflow(ctx: PruneContext) -> dict[str, Tensor]:
    if ctx.input_shape is None:
        raise ValueError("sparse.method='synflow' needs an input shape (pass input_shape)")
    flow = SynFlow(ctx.model, list(ctx.params), ctx.input_shape)
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in flow.weights.items()}
    rounds = ctx.config.synflow_iterations
    for i in range(1, rounds + 1):
        # Pruned weights score -1 (live ones are >= 0), so no round revives one.
        scores = {n: torch.where(masks[n], s, -1.0) for n, s in flow.scores(masks).items()}
        masks = ctx.select(all_reduce_mean(scores), power=i / rounds)
    return {n: m.to(ctx.params[n].device) for n, m in masks.items()}
