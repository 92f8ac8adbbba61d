"""The shared machinery of every optimizer in ``zosam.optim``.

A :class:`PerturbationOptimizer` wraps a base ``torch.optim.Optimizer`` *class* (SGD with
momentum, AdamW, ...) and shares its ``param_groups``, so learning-rate schedulers attach
to the wrapper and act on the base. Its parameters live in flat buffers
(:class:`~zosam.optim.flat.FlatParams`, one per device and dtype), and so do the saved
weights, gradients copies, directions, perturbations and masks: each of those operations
is one op per buffer. Nothing in a step reads a tensor back to the host: norms, loss
differences and the decision to skip a zero or non-finite perturbation stay on the device
(``torch.where``), and the skip counter is a device tensor read when asked.

Subclasses write :meth:`step` from these helpers:

- :meth:`_forward` runs the user's closure with or without autograd and counts the pass;
- :meth:`frozen_batchnorm` is the context in which every pass but the final one runs, so
  only the final pass updates BatchNorm running statistics;
- :meth:`_save` / :meth:`_restore` copy the weights aside and back bit-exactly (one copy);
- :meth:`_perturb` sets ``w = w0 + scale * direction`` (one op), skipping on the device;
- :meth:`_final_pass` runs the last forward and backward at the current (perturbed) weights,
  restores ``w0`` and applies the update: unscale, clip, base step, re-apply the masks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from zosam.optim.checks import COMPILE_MODES, check_args
from zosam.optim.closure import Closure, _accepts
from zosam.optim.flat import FlatList, FlatParams, dot, l2norm, like, sq_norm, usable
from zosam.sparse.masks import Maskable
from zosam.validate import in_range


def _fast_base_kwargs(base: type[torch.optim.Optimizer], params: list[Tensor],
                      kwargs: dict[str, Any]) -> dict[str, Any]:
    """``fused=True`` where torch has a fused kernel for the base optimizer and every
    parameter's device and dtype, else ``foreach=True`` (one multi-tensor op per state
    update), unless the caller chose. A fused step also lets a ``GradScaler`` skip an
    overflowing step on the device instead of reading ``found_inf`` back."""
    accepted = inspect.signature(base).parameters
    if "fused" in kwargs or "foreach" in kwargs or not params:
        return kwargs
    if "fused" in accepted:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
        if all(p.device.type in devices and p.is_floating_point() for p in params):
            return {**kwargs, "fused": True}
    if "foreach" in accepted:
        return {**kwargs, "foreach": True}
    return kwargs


class PerturbationOptimizer(torch.optim.Optimizer, Maskable):
    """Base class: a wrapper around a base optimizer that owns the passes of a step.

    Args:
        params: iterable of parameters or parameter-group dicts, as for any optimizer.
            They are moved into flat buffers (see :mod:`zosam.optim.flat`): build the
            optimizer after ``model.to(device)`` and before wrapping the model in DDP.
        base_optimizer: a ``torch.optim.Optimizer`` subclass (not an instance), e.g.
            ``torch.optim.SGD``; it is built on the wrapper's parameter groups with
            ``**base_kwargs`` and holds the state (momentum, Adam moments). Unless
            ``fused`` or ``foreach`` is given, the fused kernel is used where torch has
            one (else ``foreach``).
        defaults: the wrapper's own hyperparameters (stored in every parameter group).
        model: the ``nn.Module`` being trained, required as a keyword so it cannot be
            forgotten silently. It is used to keep BatchNorm running statistics unchanged
            in every pass but the final one. Pass ``model=None`` only for a model without
            BatchNorm: then nothing is frozen, and a BatchNorm model would have its
            running statistics updated by every query/perturbation pass too.
        max_grad_norm: clip the gradient applied by the update to this global L2 norm
            (after unscaling under a ``GradScaler``); ``None`` disables clipping.
        compile: ``"none"`` (eager) or ``"graphs"``: replay the no-grad query passes
            (ZO-SAM's) from a CUDA graph (:mod:`zosam.optim.graphs`); optimizers without
            query passes and CPU runs ignore it, and anything capture cannot handle falls
            back to eager with a message.
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ...).
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer],
        defaults: dict[str, Any],
        *,
        model: nn.Module | None,
        max_grad_norm: float | None = None,
        compile: str = "none",
        **base_kwargs: Any,
    ) -> None:
        check_args(compile=(compile, COMPILE_MODES))
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ValueError(
                f"base_optimizer={base_optimizer!r} is invalid; must be a torch.optim.Optimizer "
                "subclass such as torch.optim.SGD or torch.optim.AdamW (the class, not an instance)"
            )
        if max_grad_norm is not None:
            in_range("max_grad_norm", max_grad_norm, 0, low_open=True)
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model={type(model).__name__} is invalid; must be an nn.Module or None")
        super().__init__(params, defaults)
        trainable = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        self.flat = FlatParams(trainable)
        self.base_optimizer = base_optimizer(self.param_groups, **_fast_base_kwargs(base_optimizer, trainable,
                                                                                     base_kwargs))
        # Share the groups so schedulers and param-group edits reach the base optimizer.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.model = model
        self.max_grad_norm = max_grad_norm
        self.compile = compile
        self.masks: dict[Tensor, Tensor] = {}
        self._mask: FlatList | None = None  # flat 0/1 masks (1 for unmasked tensors)
        self.active = self.flat.numel  # number of active (perturbed) weights
        self.step_count = 0
        self._counts = {"forward": 0, "forward_no_grad": 0, "backward": 0}
        self._skipped = torch.zeros((), dtype=torch.int64, device=self.flat.flats[0].device if trainable else None)
        self._bn_layers: list[_BatchNorm] | None = None
        self._buffers: dict[str, FlatList] = {}
        self._views: dict[str, list[Tensor]] = {}
        # The gradient applied by the last update (unscaled, clipped, dense), kept only by
        # optimizers that ascend along it (AsyncSAM, guided ZO-SAM): see _keep_gradient.
        self._keeps_gradient = False
        self._has_last = False  # a gradient was kept (its content may still be unusable: zero)

    # -- public API shared by all optimizers ---------------------------------------------
    def params(self) -> list[Tensor]:
        """The optimised parameters (those with ``requires_grad``), in the flat layout's order."""
        return self.flat.params

    def _params(self) -> list[Tensor]:  # the former private name, kept for callers outside the package
        return self.flat.params

    def set_masks(self, masks: Mapping[Tensor, Tensor] | None) -> None:
        """Restrict directions, perturbations and updates to active (mask == True) weights.

        ``masks`` maps parameters of this optimizer to boolean tensors of the same shape;
        ``None`` or ``{}`` removes all masks. The weights are multiplied by their masks at
        once and after every step. (Reads the number of active weights back once.)
        """
        owned = {id(p) for p in self.params()}
        new: dict[Tensor, Tensor] = {}
        for p, m in (masks or {}).items():
            if id(p) not in owned:
                raise ValueError("set_masks: a masked tensor is not a parameter of this optimizer")
            if m.shape != p.shape:
                raise ValueError(f"set_masks: mask shape {tuple(m.shape)} != parameter shape {tuple(p.shape)}")
            new[p] = m.to(device=p.device, dtype=p.dtype)
        self.masks = new
        if not new:
            self._mask, self.active = None, self.flat.numel
            return
        flat = [torch.ones_like(t) for t in self.flat.flats]
        for p, m in new.items():
            self.flat.view_of(flat, p).copy_(m)
        self._mask = flat
        self.active = int(sum(float(t.sum()) for t in flat))
        self._apply_masks()

    @property
    def pass_counts(self) -> dict[str, int]:
        """Cumulative passes run by :meth:`step`: forward (with autograd), forward_no_grad, backward."""
        return dict(self._counts)

    @property
    def skipped_perturbations(self) -> int:
        """Steps whose perturbation was skipped (zero or non-finite); reads the device counter."""
        return int(self._skipped)

    @skipped_perturbations.setter
    def skipped_perturbations(self, value: int) -> None:
        self._skipped.fill_(int(value))

    @property
    def last_gradient(self) -> list[Tensor] | None:
        """The gradient applied by the last update (views into a flat buffer), or ``None``."""
        return self._views["last"] if self._has_last else None

    @last_gradient.setter
    def last_gradient(self, grads: list[Tensor | None] | None) -> None:
        if grads is None:
            self._has_last = False
            return
        views = self._buffer("last")
        with torch.no_grad():
            for v, g in zip(views, grads, strict=True):
                v.copy_(g) if g is not None else v.zero_()
            for t in self._buffers["last"]:
                t.nan_to_num_(0.0, 0.0, 0.0)  # a non-finite surrogate is unusable: zero
        self._has_last = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state plus the wrapper's own (step count, pass counts)."""
        return {"base": self.base_optimizer.state_dict(), "wrapper": self._wrapper_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict["base"])
        # Optimizer.load_state_dict rebuilds param_groups: re-share them.
        self.param_groups = self.base_optimizer.param_groups
        w = state_dict["wrapper"]
        self.step_count = int(w["step_count"])
        self._counts = {k: int(v) for k, v in w["pass_counts"].items()}
        self.skipped_perturbations = int(w["skipped_perturbations"])
        if self._keeps_gradient:
            self.last_gradient = w.get("last_gradient")

    def _wrapper_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step_count": self.step_count,
            "pass_counts": dict(self._counts),
            "skipped_perturbations": self.skipped_perturbations,
        }
        if self._keeps_gradient:
            last = self.last_gradient
            state["last_gradient"] = None if last is None else [g.clone() for g in last]
        return state

    @contextmanager
    def frozen_batchnorm(self) -> Iterator[None]:
        """BatchNorm layers use batch statistics but leave running statistics untouched.

        In train mode a BN layer with ``track_running_stats=False`` normalises with batch
        statistics and passes no running buffers to ``F.batch_norm``, so neither the
        running mean/var nor ``num_batches_tracked`` change: exact, and nothing is copied.
        """
        if self._bn_layers is None:
            self._bn_layers = [] if self.model is None else [
                m for m in self.model.modules() if isinstance(m, _BatchNorm)]
        layers = [m for m in self._bn_layers if m.track_running_stats]
        for m in layers:
            m.track_running_stats = False
        try:
            yield
        finally:
            for m in layers:
                m.track_running_stats = True

    _frozen_batchnorm = frozen_batchnorm  # the former private name

    # -- helpers for subclasses ------------------------------------------------------------
    def _buffer(self, name: str) -> list[Tensor]:
        """A persistent flat buffer ``name`` (allocated once), returned as per-parameter views."""
        if name not in self._buffers:
            self._buffers[name] = self.flat.zeros()
            self._views[name] = self.flat.views(self._buffers[name])
        return self._views[name]

    def _flat(self, name: str) -> FlatList:
        self._buffer(name)
        return self._buffers[name]

    def _forward(self, closure: Closure, *, grad: bool, fraction: float = 1.0, **kwargs: Any) -> Tensor:
        """Run the closure (on a ``fraction`` of the batch) and count the pass.

        ``kwargs`` (``indices=``, ``reduction=``) are passed on to the closure.
        """
        if fraction < 1.0:
            kwargs["fraction"] = fraction
        with torch.enable_grad() if grad else torch.no_grad():
            loss = closure(**kwargs)
        self._counts["forward" if grad else "forward_no_grad"] += 1
        return loss

    @staticmethod
    def _check_closure(
        closure: Closure | None, fraction: float = 1.0, *, keywords: tuple[str, ...] = (), why: str = ""
    ) -> Closure:
        """Check that a closure is given and accepts ``fraction=`` (if ``fraction < 1``)
        and every name in ``keywords`` (``why`` says which setting needs them)."""
        if closure is None:
            raise ValueError("step(closure) requires a closure that returns the mini-batch loss")
        if fraction < 1.0 and not _accepts(closure, "fraction"):
            raise ValueError(
                "query_fraction < 1 needs a closure that accepts `fraction=` "
                "(see zosam.optim.make_closure)"
            )
        missing = [k for k in keywords if not _accepts(closure, k)]
        if missing:
            names = " and ".join(f"`{k}=`" for k in missing)
            raise ValueError(f"{why} needs a closure that accepts {names} (see zosam.optim.make_closure)")
        return closure

    @torch.no_grad()
    def _save(self) -> FlatList:
        """Copy the weights aside (one copy per buffer, into a persistent buffer)."""
        self.flat.check()
        w0 = self._flat("w0")
        torch._foreach_copy_(w0, self.flat.flats)
        return w0

    @torch.no_grad()
    def _restore(self, saved: FlatList) -> None:
        torch._foreach_copy_(self.flat.flats, saved)  # bit-exact

    @torch.no_grad()
    def _grads_into(self, name: str) -> FlatList:
        """Copy the parameters' gradients into the flat buffer ``name`` (one op; a missing
        gradient is zero) and return it."""
        views = self._buffer(name)
        present = [(v, p.grad) for v, p in zip(views, self.params(), strict=True) if p.grad is not None]
        if len(present) < len(views):
            for v, p in zip(views, self.params(), strict=True):
                if p.grad is None:
                    v.zero_()
        if present:
            torch._foreach_copy_([v for v, _ in present], [g for _, g in present])
        return self._buffers[name]

    def _mdot(self, a: FlatList, b: FlatList) -> Tensor:
        """``a . b`` over the active weights (a device scalar, at least float32)."""
        return dot(a if self._mask is None else torch._foreach_mul(a, self._mask), b)

    def _masked(self, xs: FlatList) -> FlatList:
        """``xs *= mask`` in place (restrict to the active weights); returns ``xs``."""
        if self._mask is not None:
            torch._foreach_mul_(xs, self._mask)
        return xs

    @torch.no_grad()
    def _perturb(self, w0: FlatList, direction: FlatList, norm: Tensor, radius: float | Tensor,
                 *, may_be_nonfinite: bool = True, valid: Tensor | None = None) -> Tensor:
        """``w = w0 + radius * direction / norm``, or ``w = w0`` where ``norm`` is zero or not
        finite or ``valid`` (a device bool) is false (decided on the device and counted in
        ``skipped_perturbations``).

        ``direction`` must already be restricted to the active weights; it is cleaned of
        non-finite entries in place when ``may_be_nonfinite``. Returns the device bool ``ok``.
        """
        ok = usable(norm) if valid is None else usable(norm) & valid
        scale = torch.where(ok, radius / norm, torch.zeros_like(norm))
        if may_be_nonfinite:
            for d in direction:
                d.nan_to_num_(0.0, 0.0, 0.0)
        for w, a, d in zip(self.flat.flats, w0, direction, strict=True):
            torch.addcmul(a, d, like(scale, a), out=w)
        self._skipped.add_(ok.logical_not())
        return ok

    def _backward(self, loss: Tensor, scaler: torch.amp.GradScaler | None) -> None:
        self.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        self._counts["backward"] += 1

    def _final_pass(self, closure: Closure, scaler: torch.amp.GradScaler | None, w0: FlatList | None,
                    combine: Callable[[], None] | None = None, **kwargs: Any) -> Tensor:
        """The last forward and backward at the current weights, then restore ``w0`` (if
        given), ``combine()`` (turn ``.grad`` into the gradient to apply, if given) and the
        update. Returns the detached loss."""
        if w0 is None:
            self.flat.check()  # (a step that saves the weights checked already)
        loss = self._forward(closure, grad=True, **kwargs)
        self._backward(loss, scaler)
        if w0 is not None:
            self._restore(w0)
        if combine is not None:
            combine()
        self._update(scaler)
        return loss.detach()

    def _apply_masks(self) -> None:
        if self._mask is not None:
            with torch.no_grad():
                torch._foreach_mul_(self.flat.flats, self._mask)

    def _update(self, scaler: torch.amp.GradScaler | None) -> None:
        """Unscale, clip, step the base optimizer (through the scaler) and re-apply masks.

        Gradients must already hold the gradient to apply and the weights must be back at
        ``w``. Gradients of pruned weights stay dense (RigL grows by them); the masks are
        re-applied to the weights after the step, so pruned weights stay exactly zero.
        With a scaler, ``scaler.step`` skips the update on inf/NaN gradients; the
        caller still calls ``scaler.update()`` once per iteration, as in plain PyTorch.
        """
        if scaler is not None:
            scaler.unscale_(self.base_optimizer)
        if self.max_grad_norm is not None:
            self._clip_grad_norm(self.max_grad_norm)
        if self._keeps_gradient:
            self._keep_gradient()
        if scaler is not None:
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self._apply_masks()
        self.step_count += 1

    @torch.no_grad()
    def _keep_gradient(self) -> None:
        """Copy the gradient about to be applied into ``last_gradient`` (unscaled and
        clipped: called between unscaling and the base step). A non-finite gradient (a
        GradScaler overflow, whose update ``scaler.step`` skips) keeps the previous one,
        decided on the device. Under DDP the gradient is already averaged, so every rank
        keeps the same tensor."""
        if not any(p.grad is not None for p in self.params()):
            return
        new = self._grads_into("scratch")
        last = self._flat("last")
        finite = torch.isfinite(sq_norm(new))
        if not self._has_last:
            finite = torch.ones_like(finite)  # nothing to keep: store (then clean) the first one
        for a, b in zip(last, new, strict=True):
            a.copy_(torch.where(finite if finite.device == a.device else finite.to(a.device), b, a))
        if not self._has_last:
            for a in last:
                a.nan_to_num_(0.0, 0.0, 0.0)  # a first non-finite gradient is unusable: zero
        self._has_last = True

    @torch.no_grad()
    def _clip_grad_norm(self, max_norm: float) -> None:
        """Clip by the global norm of the gradient of the *active* weights (on the device).

        Gradients of pruned weights are kept dense (RigL grows by them) but they do not
        move the weights, so they must not count in the norm either.
        """
        grads = [p.grad for p in self.params() if p.grad is not None]
        if not grads:
            return
        g = self._masked(self._grads_into("scratch"))
        coef = (max_norm / (l2norm(g) + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, like(coef, grads[0]))
