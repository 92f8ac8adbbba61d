"""Dynamic sparse training (dynamic hosts): drop and grow at a fixed density.

Every update drops ``n`` active weights and grows ``n`` inactive ones, so each layer's
count stays exact (DSR: the global count). Grow candidates exclude the weights dropped in
the same update, so an update changes exactly ``2n`` positions.

==========  ==================================  ==========================================
host        drop (smallest first)               grow (largest first)
==========  ==================================  ==========================================
``set``     ``|w|`` per layer                   uniform random
``rigl``    ``|w|`` per layer                   ``|dL/dw|`` (the dense gradient)
``mest``    ``|w| + lambda |dL/dw|`` per layer  uniform random
``dsr``     ``|w|`` over all layers (global)    uniform random, spread across layers in
                                                proportion to their surviving weights
==========  ==================================  ==========================================

The drop fraction follows ``drop_schedule`` from ``drop_fraction`` at step 0 and updates
stop at ``end_fraction`` of training: with ``t = step + 1`` and ``T = end_fraction *
total_steps``, cosine gives ``f0 (1 + cos(pi t / T)) / 2``, linear ``f0 (1 - t / T)``.
For MEST this is the mutation ratio, which decays to zero.

Each host is a rule in ``DST_RULES`` (``zosam.sparse.methods``): a function of an
:class:`UpdateContext` returning the new masks and the positions changed, built from the
two update shapes here (:func:`layerwise_update`, :func:`global_update`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from zosam.sparse.config import SparsityConfig
from zosam.sparse.methods import DST_RULES

_INF = float("inf")


def is_update_step(config: SparsityConfig, step: int, total_steps: int) -> bool:
    """Whether a dynamic host updates after optimizer step ``step`` (0-based)."""
    t = step + 1
    return t % config.update_interval == 0 and t < config.end_fraction * total_steps


def drop_fraction_at(config: SparsityConfig, step: int, total_steps: int) -> float:
    """The drop (mutation) fraction used by an update after optimizer step ``step``."""
    t = step + 1
    end = config.end_fraction * total_steps
    if t >= end:
        return 0.0
    f0 = config.drop_fraction
    if config.drop_schedule == "cosine":
        return f0 * 0.5 * (1.0 + math.cos(math.pi * t / end))
    if config.drop_schedule == "linear":
        return f0 * (1.0 - t / end)
    return f0


def _count(fraction: float, active: int) -> int:
    return math.floor(fraction * active + 0.5)


def drop_grow(
    mask: Tensor, drop_score: Tensor, grow_score: Tensor, n: int, active: int
) -> tuple[Tensor, int]:
    """Drop the ``n`` active weights with the lowest ``drop_score``, grow ``n`` by ``grow_score``.

    ``active`` is the mask's active count (passed in: counting it on a GPU would cost a
    synchronisation per layer). ``n`` is capped by ``active`` and by the inactive
    positions, dropped ones excluded. Returns the new mask and the ``n`` used; exactly
    ``2 n`` positions change.
    """
    n = max(0, min(n, active, mask.numel() - active))
    if n == 0:
        return mask.clone(), 0
    flat = mask.flatten()
    drop = torch.topk(torch.where(flat, -drop_score.flatten(), -_INF), n, sorted=False).indices
    new = flat.clone()
    new[drop] = False
    # Candidates: inactive before the update (so dropped weights are not regrown at once).
    grow = torch.topk(torch.where(flat, -_INF, grow_score.flatten()), n, sorted=False).indices
    new[grow] = True
    return new.view_as(mask), n


ScoreFn = Callable[[str, Tensor], Tensor]


def layerwise_update(
    masks: Mapping[str, Tensor],
    counts: Mapping[str, int],
    fraction: float,
    drop_score: ScoreFn,
    grow_score: ScoreFn,
) -> tuple[dict[str, Tensor], int]:
    """Per-layer drop/grow of ``round(fraction * counts[l])`` weights in every layer.

    Returns the new masks and the number of positions changed.
    """
    out, changed = {}, 0
    for name, m in masks.items():
        n = _count(fraction, counts[name])
        out[name], n = drop_grow(m, drop_score(name, m), grow_score(name, m), n, counts[name])
        changed += 2 * n
    return out, changed


def global_update(
    masks: Mapping[str, Tensor],
    counts: Mapping[str, int],
    fraction: float,
    drop_score: ScoreFn,
    random_score: ScoreFn,
) -> tuple[dict[str, Tensor], int]:
    """DSR-style reallocation: global magnitude drop, random growth spread by survivors.

    Drops ``round(fraction * K)`` active weights (``K`` = global active count) with the
    lowest score over all layers, except each layer's best weight (a layer is never
    emptied), then grows the same number, allotted to layers in proportion to their
    surviving counts (largest remainders, capped by each layer's free positions); the
    global count stays exact while layers gain or lose weights. Returns the new masks and
    the number of positions changed.
    """
    names = list(masks)
    old = [masks[n].flatten() for n in names]
    scores = []
    for n, fm in zip(names, old, strict=True):
        s = torch.where(fm, drop_score(n, masks[n]).flatten().float(), _INF)
        if counts[n] > 0:
            s[torch.argmax(torch.where(fm, s, -_INF))] = _INF  # protect the layer's best
        scores.append(s)
    droppable = sum(counts.values()) - sum(1 for n in names if counts[n] > 0)
    n_drop = min(_count(fraction, sum(counts.values())), droppable)
    if n_drop == 0:
        return {n: m.clone() for n, m in masks.items()}, 0
    cat = torch.cat(old)
    cat[torch.topk(-torch.cat(scores), n_drop, sorted=False).indices] = False
    new = list(torch.split(cat, [fm.numel() for fm in old]))
    survivors = torch.stack([fm.sum() for fm in new]).tolist()  # one synchronisation
    # Free positions exclude the dropped ones (they were active before the update).
    free = [fm.numel() - counts[n] for n, fm in zip(names, old, strict=True)]
    alloc = _allocate(n_drop, survivors, free)
    out = {}
    for i, n in enumerate(names):
        if alloc[i] > 0:
            g = torch.where(old[i], -_INF, random_score(n, masks[n]).flatten().float())
            new[i][torch.topk(g, alloc[i], sorted=False).indices] = True
        out[n] = new[i].view_as(masks[n])
    return out, 2 * n_drop


def _allocate(total: int, weights: list[int], caps: list[int]) -> list[int]:
    """Split ``total`` proportionally to ``weights`` (largest remainders), ``<= caps``.

    What a capped layer cannot take is split again among the others. The caps always
    suffice: the layers' free positions add up to at least ``total``.
    """
    alloc = [0] * len(weights)
    left = total
    open_ = [i for i in range(len(weights)) if caps[i] > 0]
    while left > 0 and open_:
        wsum = sum(weights[i] for i in open_)
        share = {i: left * (weights[i] / wsum if wsum else 1 / len(open_)) for i in open_}
        give = {i: min(caps[i] - alloc[i], math.floor(share[i])) for i in open_}
        rest = left - sum(give.values())
        for i in sorted(open_, key=lambda i: share[i] - math.floor(share[i]), reverse=True):
            if rest == 0:
                break
            if alloc[i] + give[i] < caps[i]:
                give[i] += 1
                rest -= 1
        for i in open_:
            alloc[i] += give[i]
        left -= sum(give.values())
        open_ = [i for i in open_ if alloc[i] < caps[i]]
    if left:
        raise AssertionError(f"could not place {left} regrown weights")
    return alloc


def uniform_scores(generator: torch.Generator) -> ScoreFn:
    """Random scores drawn on the mask's device, seeded from the dedicated generator.

    One draw from ``generator`` seeds a generator per device and update, so the scores
    are reproducible without generating on the CPU and copying (slow for big layers).
    """
    per_device: dict[torch.device, torch.Generator] = {}

    def score(_: str, m: Tensor) -> Tensor:
        g = per_device.get(m.device)
        if g is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            g = per_device[m.device] = torch.Generator(device=m.device).manual_seed(seed)
        return torch.rand(m.shape, generator=g, device=m.device)

    return score


@dataclass
class UpdateContext:
    """What a DST rule sees at one update.

    Attributes:
        masks: ``{layer: bool mask}`` before the update.
        counts: active weights per layer (``masks``' counts, known without a device sync).
        params: ``{layer: weight}``.
        fraction: the drop (mutation) fraction of this update (:func:`drop_fraction_at`).
        config: the sparsity config (rule-specific settings such as ``mest_gradient_weight``).
        random: uniform random scores from the masking's generator (:func:`uniform_scores`).
        grads: the dense gradients of the last step, read only by rules that need them.
    """

    masks: Mapping[str, Tensor]
    counts: Mapping[str, int]
    params: Mapping[str, nn.Parameter]
    fraction: float
    config: SparsityConfig
    random: ScoreFn
    grads: Callable[[], dict[str, Tensor]]

    def magnitude(self, name: str, _mask: Tensor) -> Tensor:
        """``|w|`` of layer ``name``."""
        return self.params[name].detach().abs()


Update = tuple[dict[str, Tensor], int]


@DST_RULES.register("set")
def set_rule(ctx: UpdateContext) -> Update:
    """SET (Mocanu et al. 2018): drop the smallest ``|w|`` per layer, grow at random."""
    return layerwise_update(ctx.masks, ctx.counts, ctx.fraction, ctx.magnitude, ctx.random)


@DST_RULES.register("rigl")
def rigl_rule(ctx: UpdateContext) -> Update:
    """RigL (Evci et al. 2020): drop the smallest ``|w|`` per layer, grow the largest ``|dL/dw|``."""
    grads = ctx.grads()
    return layerwise_update(ctx.masks, ctx.counts, ctx.fraction, ctx.magnitude, lambda n, _m: grads[n].abs())


@DST_RULES.register("mest")
def mest_rule(ctx: UpdateContext) -> Update:
    """MEST (Yuan et al. 2021): drop the smallest ``|w| + lambda |dL/dw|`` per layer, grow at random."""
    grads = ctx.grads()
    lam = ctx.config.mest_gradient_weight

    def score(n: str, _m: Tensor) -> Tensor:
        return ctx.params[n].detach().abs() + lam * grads[n].abs()

    return layerwise_update(ctx.masks, ctx.counts, ctx.fraction, score, ctx.random)


@DST_RULES.register("dsr")
def dsr_rule(ctx: UpdateContext) -> Update:
    """DSR (Mostafa & Wang 2019): global magnitude drop, random growth spread by survivors."""
    return global_update(ctx.masks, ctx.counts, ctx.fraction, ctx.magnitude, ctx.random)
