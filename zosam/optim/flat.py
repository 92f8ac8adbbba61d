"""Flat parameter storage: the parameters of an optimizer as views into one contiguous
buffer per (device, dtype), so that a perturbation, a save, a restore or a norm is one op
per buffer instead of one per tensor (on a GPU each op is a kernel launch).

:class:`FlatParams` moves every parameter's values into its buffer once and points the
parameter at a view (``p.data = view``). The autograd identity of the parameter is kept
(same tensor object, same gradient accumulator), so modules, ``state_dict`` loading
(``copy_`` in place), DDP (built before or after, see below), masks and the base
optimizer's per-parameter state are unaffected.

Where the views can break: anything that *replaces* ``p.data`` instead of writing into it
(``model.to(other_device_or_dtype)``, ``module._apply``, ``p.data = ...``). Build the
optimizer after moving the model; :meth:`FlatParams.check` (run at every step, no tensor
op) raises a clear error if the views no longer alias their buffer, and
:meth:`FlatParams.rebuild` re-flattens in place (then the base optimizer's state must be
on the parameters' device already, as torch requires anyway). DDP: build the optimizer
(which flattens) before wrapping the model, so DDP registers the final storage; a later
flatten keeps the parameter objects and their gradient hooks, so it works too.

A *flat list* is a list with one tensor per buffer (almost always a single tensor), the
type of saved weights, estimates, directions, masks and perturbations; ``torch._foreach_*``
ops act on it as one op per buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

FlatList = list[Tensor]


@dataclass
class _Bucket:
    flat: Tensor
    params: list[Tensor]
    offsets: list[int]


def _view(flat: Tensor, p: Tensor, offset: int) -> Tensor:
    """``p``'s place in ``flat`` with ``p``'s own strides (channels-last weights stay so)."""
    if p.is_contiguous():
        return flat[offset:offset + p.numel()].view(p.shape)
    return flat.as_strided(p.shape, p.stride(), offset)


def _dense(p: Tensor) -> bool:
    """Whether ``p``'s memory is exactly ``numel`` elements without gaps (so it fits a slice)."""
    if p.is_contiguous():
        return True
    # Non-overlapping and dense: the strides sorted by size are a permutation of a contiguous layout.
    dims = sorted(range(p.dim()), key=lambda d: p.stride(d))
    expected = 1
    for d in dims:
        if p.size(d) != 1 and p.stride(d) != expected:
            return False
        expected *= p.size(d)
    return True


def _adopt(ps: list[Tensor], offsets: list[int], n: int) -> Tensor | None:
    """The buffer ``ps`` already lie in, in this layout (another optimizer over the same
    parameters flattened them), or ``None``. Adopting it instead of copying keeps the other
    optimizer's views valid, so several optimizers can take turns on one model."""
    storage = ps[0].untyped_storage()
    start = ps[0].storage_offset()
    for p, off in zip(ps, offsets, strict=True):
        if (not p.is_contiguous() or p.untyped_storage().data_ptr() != storage.data_ptr()
                or p.storage_offset() != start + off):
            return None
    if (start + n) * ps[0].element_size() > storage.nbytes():
        return None
    return torch.empty(0, device=ps[0].device, dtype=ps[0].dtype).set_(storage, start, (n,))


class FlatParams:
    """The parameters ``params`` as views into one buffer per (device, dtype).

    Args:
        params: the parameters, in the optimizer's order (the order of the flat layout).
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.buckets: list[_Bucket] = []
        self.rebuild()

    @torch.no_grad()
    def rebuild(self) -> None:
        """(Re-)flatten: copy every parameter into a fresh buffer and point it at its view
        (or adopt the buffer the parameters already lie in, in this layout)."""
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in self.params:
            if not _dense(p):
                raise ValueError("flat storage needs dense parameters (no gaps or overlaps in memory)")
            groups.setdefault((p.device, p.dtype), []).append(p)
        self.buckets = []
        for (device, dtype), ps in groups.items():
            offsets, n = [], 0
            for p in ps:
                offsets.append(n)
                n += p.numel()
            flat = _adopt(ps, offsets, n)
            if flat is None:
                flat = torch.empty(n, device=device, dtype=dtype)
                for p, off in zip(ps, offsets, strict=True):
                    view = _view(flat, p, off)
                    view.copy_(p)
                    p.data = view
            self.buckets.append(_Bucket(flat, ps, offsets))
        self._index = {id(p): (b, i) for b, bucket in enumerate(self.buckets) for i, p in enumerate(bucket.params)}
        self._ptrs = [p.data_ptr() for p in self.params]

    @property
    def flats(self) -> FlatList:
        """The weights, one flat tensor per buffer (writing into them writes the parameters)."""
        return [b.flat for b in self.buckets]

    @property
    def numel(self) -> int:
        return sum(b.flat.numel() for b in self.buckets)

    def check(self) -> None:
        """Raise if a parameter no longer aliases its buffer (``p.data`` was replaced)."""
        if [p.data_ptr() for p in self.params] != self._ptrs:
            raise RuntimeError(
                "an optimizer parameter no longer aliases the optimizer's flat buffer (its storage was "
                "replaced, e.g. by model.to(...) or p.data = ... after the optimizer was built): build the "
                "optimizer after moving the model, or call optimizer.flat.rebuild()"
            )

    def empty(self, dtype: torch.dtype | None = None) -> FlatList:
        """A new flat list shaped like the weights (``dtype``: override, e.g. for masks)."""
        return [torch.empty_like(b.flat, dtype=dtype or b.flat.dtype) for b in self.buckets]

    def zeros(self) -> FlatList:
        return [torch.zeros_like(b.flat) for b in self.buckets]

    def views(self, flats: FlatList) -> list[Tensor]:
        """One view per parameter (in ``params`` order) into ``flats``, shaped like it."""
        out = []
        for p in self.params:
            b, i = self._index[id(p)]
            out.append(_view(flats[b], p, self.buckets[b].offsets[i]))
        return out

    def view_of(self, flats: FlatList, p: Tensor) -> Tensor:
        b, i = self._index[id(p)]
        return _view(flats[b], p, self.buckets[b].offsets[i])

    def bucket_views(self, flats: FlatList, b: int) -> list[Tensor]:
        """Views into ``flats[b]`` of the parameters of bucket ``b``."""
        bucket = self.buckets[b]
        return [_view(flats[b], p, off) for p, off in zip(bucket.params, bucket.offsets, strict=True)]


def like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` on ``ref``'s device in ``ref``'s dtype; ``t`` itself (no op) when it already is."""
    if t.dtype == ref.dtype and t.device == ref.device:
        return t
    return t.to(device=ref.device, dtype=ref.dtype)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (half precision is lifted, float64 stays)."""
    return torch.promote_types(dtype, torch.float32)


def sq_norm(xs: FlatList) -> Tensor:
    """``sum ||x||^2`` over a flat list, as a 0-dim tensor in at least float32 on the first
    buffer's device: one reduction per buffer, no host sync."""
    out = None
    for x in xs:
        s = torch.linalg.vector_norm(x, dtype=wide_dtype(x.dtype)).square()
        out = s if out is None else out + s.to(out.device)
    assert out is not None
    return out


def l2norm(xs: FlatList) -> Tensor:
    """``sqrt(sum ||x||^2)`` over a flat list, in at least float32: one reduction for a
    single buffer, no host sync."""
    if len(xs) == 1:
        return torch.linalg.vector_norm(xs[0], dtype=wide_dtype(xs[0].dtype))
    return sq_norm(xs).sqrt()


def dot(a: FlatList, b: FlatList) -> Tensor:
    """``sum a . b`` over flat lists, in at least float32, on the first buffer's device."""
    out = None
    for x, y in zip(a, b, strict=True):
        d = wide_dtype(x.dtype)
        s = torch.dot(x.to(d), y.to(d)) if d != x.dtype else torch.dot(x, y)
        out = s if out is None else out + s.to(out.device)
    assert out is not None
    return out


def usable(norm: Tensor) -> Tensor:
    """``norm`` is finite and > 0 (a device bool, no sync)."""
    return torch.isfinite(norm) & (norm > 0)


def wide(t: Tensor) -> Tensor:
    """``t`` in at least float32: half-precision losses and norms are lifted, float64 stays
    float64 (so float64 runs keep their precision through norms and loss differences)."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    return t if t.dtype == dtype else t.to(dtype)


def global_norm(tensors: list[Tensor]) -> float:
    """The L2 norm of a list of tensors as one vector, in at least float32, read back to
    the host (one synchronisation: for diagnostics and tests, not for a step). 0.0 for an
    empty list."""
    if not tensors:
        return 0.0
    norms = torch._foreach_norm(tensors)
    dev = norms[0].device
    return float(torch.linalg.vector_norm(torch.stack([wide(n).to(dev) for n in norms])))
