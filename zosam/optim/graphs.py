"""Optional CUDA-graph capture of the no-grad query passes (``compile: graphs``).

A ZO-SAM step runs 2q (or q + 1) no-grad forwards that differ only in the weights. With
``compile="graphs"`` the first such pass of a run is captured into a ``torch.cuda.CUDAGraph``
reading static buffers: the weights are the optimizer's flat buffer itself (the step
perturbs it in place before each replay), the batch is copied into a static input buffer
once per step, and the loss lands in a static output that the step copies aside. A replay
is one launch instead of one per op of the forward.

Random layers: the graph draws from the default CUDA generator, which torch registers
with the graph (its seed and offset are read at every replay), so the per-query reseeding
of :class:`~zosam.optim.zosam.ZOSAM` keeps working: both points of a pair see the same
dropout masks, and the generator's state is the caller's (saved in checkpoints as usual).

Where capture cannot work the step runs eagerly, with one message saying why: a CPU run
(``compile`` is ignored), a closure that is not :func:`~zosam.optim.make_closure`'s, a
batch of another shape than the captured one (a last partial batch: eager for that step),
or a capture that raises (the error is in the message; eager from then on).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from zosam.optim.closure import BatchClosure, Closure

log = logging.getLogger(__name__)


class GraphedQueries:
    """The no-grad query pass of one optimizer as a replayable CUDA graph (see the module docstring).

    :meth:`loss` returns the loss of one query at the current weights, or ``None`` where
    the caller must run the pass eagerly.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self._key: tuple | None = None
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._out: Tensor | None = None
        self._source: tuple[Tensor, Tensor] | None = None
        self._told: set[str] = set()
        if device.type != "cuda":
            self._tell("cpu", f"compile='graphs' is ignored on {device.type}: CUDA graphs need a CUDA device")
            self.failed = True

    def _tell(self, why: str, message: str) -> None:
        if why not in self._told:  # once per reason, not once per step
            self._told.add(why)
            # Ignoring the option on a CPU is expected (configs are shared with GPU runs).
            log.log(logging.INFO if why == "cpu" else logging.WARNING, "%s; running the query passes eagerly",
                    message)

    def loss(self, closure: Closure, fraction: float) -> Tensor | None:
        if self.failed:
            return None
        if not isinstance(closure, BatchClosure):
            self._tell("closure", "compile='graphs' needs the closure of zosam.optim.make_closure")
            return None
        x, y = closure.inputs, closure.targets
        key = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype, fraction)
        if self.graph is None:
            try:
                self._capture(closure, fraction, key)
            except Exception as exc:  # any capture failure falls back to eager
                self.failed = True
                self.graph = None
                self._tell("capture", f"CUDA-graph capture of the query pass failed ({type(exc).__name__}: {exc})")
                return None
        elif key != self._key:
            self._tell("shape", f"batch shape {tuple(x.shape)} differs from the captured {self._key[0]} "
                                "(e.g. a last partial batch)")
            return None
        assert self._x is not None and self._y is not None and self._out is not None and self.graph is not None
        if self._source is None or self._source[0] is not x or self._source[1] is not y:
            self._x.copy_(x)  # once per step: the queries of a step share the batch
            self._y.copy_(y)
            self._source = (x, y)
        self.graph.replay()
        return self._out

    def _capture(self, closure: BatchClosure, fraction: float, key: tuple) -> None:
        self._x, self._y = closure.inputs.clone(), closure.targets.clone()
        static = closure.rebind(self._x, self._y)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):  # warm-up on a side stream, as capture requires
                static(fraction)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            self._out = static(fraction)
        self.graph, self._key = graph, key
        self._source = None
