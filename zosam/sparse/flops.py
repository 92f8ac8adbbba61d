"""FLOPs of a (sparse) model: multiply-adds per input sample over active conv/linear weights.

A conv weight is used once per output position, so a conv layer costs
``active_weights * H_out * W_out`` multiply-adds (groups are already folded into the
weight's shape); a linear layer costs ``active_weights * tokens`` (``tokens`` = the
product of the output's middle dimensions, 1 for a plain ``(B, features)`` input).
Output sizes come from forward hooks on one dummy input. Biases, norms, activations
and attention's matmuls are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from zosam.sparse.masks import weight_layers


def count_flops(
    model: nn.Module,
    input_shape: tuple[int, ...],
    masks: Mapping[Tensor | str, Tensor] | None = None,
) -> int:
    """Multiply-adds of one forward pass on one sample of ``input_shape`` (no batch dim).

    Args:
        model: the model; its mode and buffers are left unchanged (it runs in eval mode
            under ``no_grad``).
        input_shape: one sample's shape, e.g. ``(3, 32, 32)``.
        masks: boolean masks keyed by weight parameter or by parameter name
            (``"layer1.0.conv1.weight"``); a layer without a mask counts all its weights.

    Returns:
        The multiply-add count (an int).
    """
    masks = masks or {}
    active: dict[nn.Module, int] = {}
    for name, m in weight_layers(model):
        mask = masks.get(m.weight)
        if mask is None:
            mask = masks.get(f"{name}.weight")
        active[m] = int(mask.sum()) if mask is not None else m.weight.numel()
    total = 0

    def hook(module: nn.Module, _inp: object, out: Tensor) -> None:
        nonlocal total
        # Linear: (B, ..., features) -> tokens; conv: (B, C, *spatial) -> positions.
        dims = out.shape[1:-1] if isinstance(module, nn.Linear) else out.shape[2:]
        total += active[module] * math.prod(dims)

    handles = [m.register_forward_hook(hook) for m in active]
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=param.dtype, device=param.device))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return total
