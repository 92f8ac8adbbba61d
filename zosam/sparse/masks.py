"""The mask mechanism: which weights are maskable, masks from scores, and mask bookkeeping.

Maskable weights are the ``weight`` of every conv and linear layer; biases and norm
layers always stay dense, and by default so do the first layer (its input has few
channels, so pruning it costs accuracy for almost no savings) and the classifier.
Masks are boolean tensors shaped like their weight, ``True`` = active. They are applied
to the weights (``w *= mask``) after every optimizer step (:func:`apply_masks`, or by
the optimizer itself if it implements :class:`Maskable`), so gradients of pruned weights
stay dense (RigL grows by them).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

#: Module types whose ``weight`` is maskable.
MASKABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

__all__ = [
    "MASKABLE_TYPES",
    "Maskable",
    "apply_masks",
    "broadcast_masks",
    "global_topk_masks",
    "maskable_parameters",
    "reset_optimizer_state",
    "topk_mask",
]


@torch.no_grad()
def apply_masks(masks: Mapping[Tensor, Tensor]) -> None:
    """Zero every pruned weight: ``p *= mask`` for each ``(p, mask)``.

    The project's single mask-application function for plain torch optimizers
    (``Masking.apply``); :class:`Maskable` optimizers apply their masks themselves.
    """
    for p, m in masks.items():
        p.mul_(m)


class Maskable(abc.ABC):
    """An optimizer that takes the masks and keeps pruned weights at zero itself.

    ``Masking.attach`` hands masks to a ``Maskable`` optimizer through :meth:`set_masks`
    (now and after every mask update) and leaves the re-application after each step to
    it; any other optimizer gets its weights masked by ``Masking.step``. The optimizers of
    ``zosam.optim`` subclass it.
    """

    @abc.abstractmethod
    def set_masks(self, masks: Mapping[Tensor, Tensor] | None) -> None:
        """Restrict every perturbation and update to ``mask == True`` weights (``None``: no masks)
        and multiply the weights by their masks now and after every step."""


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv/linear modules in registration order (the first is the input layer)."""
    seen: set[int] = set()
    out = []
    for name, m in model.named_modules():
        if isinstance(m, MASKABLE_TYPES) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append((name, m))
    return out


def maskable_parameters(
    model: nn.Module, *, dense_first_layer: bool = True, dense_classifier: bool = True
) -> dict[str, nn.Parameter]:
    """``{"<module>.weight": weight}`` of the conv/linear layers that may be pruned.

    The first layer is the first conv/linear module registered; the classifier is the
    last ``nn.Linear`` registered.
    """
    layers = weight_layers(model)
    skip: set[str] = set()
    if dense_first_layer and layers:
        skip.add(layers[0][0])
    linears = [name for name, m in layers if isinstance(m, nn.Linear)]
    if dense_classifier and linears:
        skip.add(linears[-1])
    return {
        f"{name}.weight" if name else "weight": m.weight for name, m in layers if name not in skip
    }


def topk_mask(score: Tensor, k: int) -> Tensor:
    """Boolean mask of ``score``'s shape with exactly the ``k`` largest entries ``True``."""
    flat = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        flat[torch.topk(score.flatten(), k, sorted=False).indices] = True
    return flat.view_as(score)


def global_topk_masks(
    scores: Mapping[str, Tensor], k: int, *, keep_one_per_layer: bool = False
) -> dict[str, Tensor]:
    """Masks keeping the ``k`` largest scores over all layers together.

    With ``keep_one_per_layer`` (and ``k`` >= the number of layers) each layer's best
    score is kept first, so no layer is emptied; the total stays exactly ``k``.
    """
    names = list(scores)
    flats = [scores[n].flatten() for n in names]
    if keep_one_per_layer and k >= len(names):
        flats = [f.clone().index_fill_(0, f.argmax().view(1), float("inf")) for f in flats]
    keep = topk_mask(torch.cat(flats), k)
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start : start + size].view_as(scores[n])
        start += size
    return out


@torch.no_grad()
def reset_optimizer_state(
    optimizers: Iterable[object], param: Tensor, positions: Tensor
) -> None:
    """Zero the optimizer state of ``param`` at ``positions`` (a boolean tensor).

    Works on any torch optimizer or wrapper with ``base_optimizer``: every state entry
    shaped like the parameter (SGD's ``momentum_buffer``, Adam's ``exp_avg`` and
    ``exp_avg_sq``, ...) is zeroed there; scalars such as Adam's ``step`` are shared by
    the whole tensor and left alone.
    """
    for opt in optimizers:
        base = getattr(opt, "base_optimizer", opt)
        state = base.state.get(param) if hasattr(base, "state") else None
        if not state:
            continue
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                value.masked_fill_(positions.to(value.device), 0)


def distributed_world() -> int:
    """World size if ``torch.distributed`` is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def broadcast_masks(masks: dict[str, Tensor], src: int = 0) -> dict[str, Tensor]:
    """Make every rank's masks equal to rank ``src``'s (one broadcast of all masks).

    A no-op without an initialised process group. The masks are packed into a single
    uint8 buffer (gloo and NCCL both broadcast uint8) on the masks' device.
    """
    if distributed_world() == 1 or not masks:
        return masks
    names = list(masks)
    flat = torch.cat([masks[n].flatten().to(torch.uint8) for n in names])
    dist.broadcast(flat, src=src)
    out, start = {}, 0
    for n in names:
        size = masks[n].numel()
        out[n] = flat[start : start + size].view_as(masks[n]).bool()
        start += size
    return out


def all_reduce_mean(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Average score tensors over ranks (a no-op without a process group)."""
    world = distributed_world()
    if world == 1:
        return tensors
    for t in tensors.values():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world)
    return tensors
