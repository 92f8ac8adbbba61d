"""The shared machinery of every optimizer in ``zosam.optim``.

A :class:`PerturbationOptimizer` wraps a base ``torch.optim.Optimizer`` *class* (SGD with
momentum, AdamW, ...) and shares its ``param_groups``, so learning-rate schedulers attach
to the wrapper and act on the base. Subclasses implement :meth:`step` from four helpers:

- :meth:`_forward` runs the user's closure with or without autograd and counts the pass;
- :meth:`_frozen_batchnorm` is the context in which every pass but the final one runs, so
  only the final pass updates BatchNorm running statistics;
- :meth:`_save` / :meth:`_restore` copy the weights aside and back bit-exactly;
- :meth:`_update` zeroes gradients, runs the one backward of the final pass (scaled by a
  ``GradScaler`` if given), unscales, clips, steps the base optimizer and re-applies the
  sparse masks.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from zosam.validate import choice, in_range

Closure = Callable[..., Tensor]


@torch.no_grad()
def apply_masks(masks: Mapping[Tensor, Tensor]) -> None:
    """Zero every pruned weight: ``p *= mask`` for each ``(p, mask)``.

    The project's single mask-application function: optimizers call it after every step,
    ``zosam.sparse.Masking.apply`` calls it for plain torch optimizers.
    """
    for p, m in masks.items():
        p.mul_(m)


def make_closure(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    autocast: torch.autocast | None = None,
    record: Callable[[Tensor, Tensor], None] | None = None,
) -> Closure:
    """Build the standard closure for :meth:`PerturbationOptimizer.step`.

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

    def closure(fraction: float = 1.0, *, indices: Tensor | None = None, reduction: str = "mean") -> Tensor:
        choice("reduction", reduction, ("mean", "none"))
        if indices is not None:
            if fraction < 1.0:
                raise ValueError("closure: pass either fraction < 1 or indices, not both")
            x, y = inputs[indices], targets[indices]
        else:
            n = inputs.shape[0] if fraction >= 1.0 else max(1, math.ceil(fraction * inputs.shape[0]))
            x, y = inputs[:n], targets[:n]
        kwargs = {} if reduction == "mean" else {"reduction": reduction}
        if autocast is None:
            out = model(x)
        else:
            with autocast:
                out = model(x)
        if record is not None and indices is None and fraction >= 1.0 and torch.is_grad_enabled():
            record(out.detach(), y)
        if autocast is None:
            return loss_fn(out, y, **kwargs)
        with autocast:
            return loss_fn(out, y, **kwargs)

    return closure


def _accepts(fn: Callable[..., Any], keyword: str) -> bool:
    params = inspect.signature(fn).parameters
    return keyword in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def wide(t: Tensor) -> Tensor:
    """``t`` in at least float32: half-precision losses and norms are lifted, float64 stays
    float64 (so float64 runs keep their precision through norms and loss differences)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def global_norm(tensors: list[Tensor]) -> float:
    """The L2 norm of a list of tensors as one vector, in at least float32; the per-tensor
    norms are moved to one device before they are stacked (a model may span devices) and
    read back with one synchronisation. 0.0 for an empty list."""
    if not tensors:
        return 0.0
    norms = torch._foreach_norm(tensors)
    dev = norms[0].device
    return float(torch.linalg.vector_norm(torch.stack([wide(n).to(dev) for n in norms])))


class PerturbationOptimizer(torch.optim.Optimizer):
    """Base class: a wrapper around a base optimizer that owns the passes of a step.

    Args:
        params: iterable of parameters or parameter-group dicts, as for any optimizer.
        base_optimizer: a ``torch.optim.Optimizer`` subclass (not an instance), e.g.
            ``torch.optim.SGD``; it is built on the wrapper's parameter groups with
            ``**base_kwargs`` and holds the state (momentum, Adam moments).
        defaults: the wrapper's own hyperparameters (stored in every parameter group).
        model: the ``nn.Module`` being trained, required as a keyword so it cannot be
            forgotten silently. It is used to keep BatchNorm running statistics unchanged
            in every pass but the final one. Pass ``model=None`` only for a model without
            BatchNorm: then nothing is frozen, and a BatchNorm model would have its
            running statistics updated by every query/perturbation pass too.
        max_grad_norm: clip the gradient applied by the update to this global L2 norm
            (after unscaling under a ``GradScaler``); ``None`` disables clipping.
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
        **base_kwargs: Any,
    ) -> None:
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
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # Share the groups so schedulers and param-group edits reach the base optimizer.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.model = model
        self.max_grad_norm = max_grad_norm
        self.masks: dict[Tensor, Tensor] = {}
        self.step_count = 0
        self._counts = {"forward": 0, "forward_no_grad": 0, "backward": 0}
        self.skipped_perturbations = 0
        # The gradient applied by the last update (unscaled, clipped, dense), kept only by
        # optimizers that ascend along it (AsyncSAM, guided ZO-SAM): see _keep_gradient.
        self.last_gradient: list[Tensor | None] | None = None
        self._keeps_gradient = False

    # -- public API shared by all optimizers ---------------------------------------------
    def set_masks(self, masks: Mapping[Tensor, Tensor] | None) -> None:
        """Restrict directions, perturbations and updates to active (mask == True) weights.

        ``masks`` maps parameters of this optimizer to boolean tensors of the same shape;
        ``None`` or ``{}`` removes all masks. The weights are multiplied by their masks at
        once and after every step.
        """
        owned = {p for p in self._params()}
        new: dict[Tensor, Tensor] = {}
        for p, m in (masks or {}).items():
            if p not in owned:
                raise ValueError("set_masks: a masked tensor is not a parameter of this optimizer")
            if m.shape != p.shape:
                raise ValueError(f"set_masks: mask shape {tuple(m.shape)} != parameter shape {tuple(p.shape)}")
            new[p] = m.to(device=p.device, dtype=p.dtype)
        self.masks = new
        apply_masks(self.masks)

    @property
    def pass_counts(self) -> dict[str, int]:
        """Cumulative passes run by :meth:`step`: forward (with autograd), forward_no_grad, backward."""
        return dict(self._counts)

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
            stored = w.get("last_gradient")
            self.last_gradient = None if stored is None else [
                None if g is None else g.to(device=p.device, dtype=p.dtype)
                for p, g in zip(self._params(), stored, strict=True)
            ]

    def _wrapper_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step_count": self.step_count,
            "pass_counts": dict(self._counts),
            "skipped_perturbations": self.skipped_perturbations,
        }
        if self._keeps_gradient:
            state["last_gradient"] = self.last_gradient
        return state

    # -- helpers for subclasses ------------------------------------------------------------
    def _params(self) -> Iterator[Tensor]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield p

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

    @contextmanager
    def _frozen_batchnorm(self) -> Iterator[None]:
        """BatchNorm layers use batch statistics but leave running statistics untouched.

        In train mode a BN layer with ``track_running_stats=False`` normalises with batch
        statistics and passes no running buffers to ``F.batch_norm``, so neither the
        running mean/var nor ``num_batches_tracked`` change: exact, and nothing is copied.
        """
        layers = []
        if self.model is not None:
            layers = [m for m in self.model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        for m in layers:
            m.track_running_stats = False
        try:
            yield
        finally:
            for m in layers:
                m.track_running_stats = True

    @torch.no_grad()
    def _save(self) -> list[Tensor]:
        return [p.detach().clone() for p in self._params()]

    @torch.no_grad()
    def _restore(self, saved: list[Tensor]) -> None:
        torch._foreach_copy_(list(self._params()), saved)  # one multi-tensor op, bit-exact

    @torch.no_grad()
    def _perturb(self, saved: list[Tensor], e: list[Tensor | None]) -> None:
        """Set ``w = w0 + e`` (``e`` already masked; ``None`` leaves the tensor at w0)."""
        for p, w0, ep in zip(self._params(), saved, e, strict=True):
            if ep is not None:
                torch.add(w0, ep, out=p)

    def _backward(self, loss: Tensor, scaler: torch.amp.GradScaler | None) -> None:
        self.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        self._counts["backward"] += 1

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
        apply_masks(self.masks)
        self.step_count += 1

    @torch.no_grad()
    def _keep_gradient(self) -> None:
        """Copy the gradient about to be applied into ``last_gradient`` (unscaled and
        clipped: called between unscaling and the base step). A non-finite gradient (a
        GradScaler overflow, whose update ``scaler.step`` skips) keeps the previous one.
        Under DDP the gradient is already averaged, so every rank keeps the same tensor."""
        grads = [p.grad for p in self._params()]
        present = [g for g in grads if g is not None]
        if not present:
            return
        if not math.isfinite(global_norm(present)):
            return
        old = self.last_gradient
        if old is None or any((o is None) != (g is None) for o, g in zip(old, grads, strict=True)):
            self.last_gradient = [None if g is None else g.detach().clone() for g in grads]
        else:  # reuse the buffers: no allocation per step
            torch._foreach_copy_([o for o in old if o is not None], present)

    @torch.no_grad()
    def _clip_grad_norm(self, max_norm: float) -> None:
        """Clip by the global norm of the gradient of the *active* weights.

        Gradients of pruned weights are kept dense (RigL grows by them) but they do not
        move the weights, so they must not count in the norm either.
        """
        grads = [(p.grad, self.masks.get(p)) for p in self._params() if p.grad is not None]
        if not grads:
            return
        dev = grads[0][0].device  # a model may span devices: the per-tensor sums meet on one
        sq = torch.stack([wide(g if m is None else g * m).pow(2).sum().to(dev) for g, m in grads]).sum()
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for g, _ in grads:
            g.mul_(coef.to(g.device, g.dtype))

    def _masked(self, p: Tensor, t: Tensor) -> Tensor:
        m = self.masks.get(p)
        return t if m is None else t.mul_(m)
