"""Direction samplers: the random vectors of ZO-SAM (Gaussian, sphere, guided), RWP
(Gaussian) and ESAM (Bernoulli weight masks), drawn into flat buffers.

An optimizer *has* a sampler (composition): ``sampler.draw(out, seed, mask)`` fills the
flat list ``out`` (one tensor per parameter buffer, see :mod:`zosam.optim.flat`) with
this step's draw and returns it. A draw is one random-number op per buffer from a
dedicated ``torch.Generator`` per device, seeded with ``seed`` (the optimizers use
``derive_seed(seed, step, query)``): the same seed gives the same draw, a resumed run
draws what an uninterrupted one would, every DDP rank draws alike, and the global RNG is
never touched. Nothing here reads a value back to the host.

The stream: for a single parameter tensor of shape ``s`` the draw equals
``torch.randn(s, generator=torch.Generator().manual_seed(seed))`` (Bernoulli:
``torch.rand(s, ...) < beta`` in float32); for several tensors it is one draw of the
flat buffer, which the tensors then view.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from zosam.optim.flat import FlatList, l2norm


class DirectionSampler(Protocol):
    """What an optimizer needs of a sampler."""

    def draw(self, out: FlatList, seed: int, mask: FlatList | None) -> FlatList:
        """Fill ``out`` with the draw of ``seed`` restricted to ``mask`` (1 = active); return it."""
        ...


_MASK64 = (1 << 64) - 1


def derive_seed(*values: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 finaliser on a running hash).

    Gives well-separated streams for neighbouring ``(seed, step, query)`` triples, which
    ``seed + step`` arithmetic would not (``(0, 1)`` and ``(1, 0)`` would collide).
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


class Seeded:
    """One dedicated generator per device, reseeded per draw."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def _seeded(self, out: FlatList, seed: int) -> list[torch.Generator]:
        """A generator per buffer; each device's generator is seeded once per draw, so
        buffers on one device continue one stream."""
        gens, seeded = [], set()
        for t in out:
            gen = self._generators.get(t.device)
            if gen is None:
                gen = self._generators[t.device] = torch.Generator(device=t.device)
            if t.device not in seeded:
                gen.manual_seed(seed)
                seeded.add(t.device)
            gens.append(gen)
        return gens


def _mask(out: FlatList, mask: FlatList | None) -> FlatList:
    if mask is not None:
        torch._foreach_mul_(out, mask)
    return out


class Gaussian(Seeded):
    """``u ~ N(0, I)`` over the active weights."""

    def draw(self, out: FlatList, seed: int, mask: FlatList | None) -> FlatList:
        for t, gen in zip(out, self._seeded(out, seed), strict=True):
            t.normal_(generator=gen)
        return _mask(out, mask)


class Sphere(Gaussian):
    """Uniform on the sphere of radius ``sqrt(d)``, ``d`` the number of active weights (so
    ``E||u||^2`` matches the Gaussian's): the Gaussian draw rescaled on the device."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0  # set by the optimizer (number of active weights)

    def draw(self, out: FlatList, seed: int, mask: FlatList | None) -> FlatList:
        super().draw(out, seed, mask)
        z = l2norm(out)
        scale = torch.where(z > 0, math.sqrt(self.active) / z, torch.zeros_like(z))
        torch._foreach_mul_(out, scale.to(out[0].dtype))
        return out


class Bernoulli(Seeded):
    """ESAM's stochastic weight perturbation: ``m_j ~ Bernoulli(beta)`` per weight (drawn as
    ``rand < beta`` in float32 for any dtype), as 0/1 in the buffer's dtype."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def draw(self, out: FlatList, seed: int, mask: FlatList | None) -> FlatList:
        for t, gen in zip(out, self._seeded(out, seed), strict=True):
            r = t if t.dtype == torch.float32 else torch.empty(t.shape, device=t.device)
            r.uniform_(generator=gen).lt_(self.beta)  # torch.rand's stream; 0/1 in place, no bool buffer
            if r is not t:
                t.copy_(r)
        return _mask(out, mask)


def sampler(kind: str) -> Gaussian:
    """The isotropic sampler named ``kind`` (``"gaussian"`` or ``"sphere"``)."""
    return Sphere() if kind == "sphere" else Gaussian()


__all__ = ["Bernoulli", "DirectionSampler", "Gaussian", "Seeded", "Sphere", "derive_seed", "sampler"]
