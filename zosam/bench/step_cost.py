"""Step cost of SGD, SAM, ZO-SAM (and the peers) side by side in one process.

For each method: median seconds per step (warm-up first, then rounds interleaved across
methods so that machine noise hits all alike), the ratio to SGD, passes per step, and
peak memory. A single no-grad forward pass is timed too (at full and query batch size),
so ZO-SAM's cost can be checked against its budget: ``SGD step + n_no_grad * forward``.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` around one step; on the CPU
the peak growth of the resident set size during one step (sampled every 0.5 ms) in a
fresh subprocess that built the model and the batch and ran one warm-up step.

``--count-ops`` adds, per method, what a step issues (``torch.profiler``, after warm-up,
over ``--count-steps`` steps, so LookSAM's every-k-th SAM step is averaged in):

- ``ops``: top-level aten ops per step, i.e. ``aten::`` events with no ``aten::`` event
  above them (a call such as ``_foreach_add_`` counts once, not its sub-calls; backward
  ops run under ``autograd::engine`` nodes and count too). On a GPU each is one kernel
  launch or more, which is what a launch-bound step pays for.
- ``extra``: ops beyond the method's passes: ``ops - ops(SGD) - (F - 1) fwd - N nograd -
  (B - 1) bwd`` with F, N, B its passes per step and ``fwd`` / ``nograd`` / ``bwd`` the
  ops of one forward with autograd (loss included), one no-grad forward and one
  backward, profiled alone. The extra passes run with BatchNorm statistics frozen (as
  every pass but the final one does: no ``num_batches_tracked`` update, one op fewer per
  BN layer), so ``fwd`` and ``nograd`` are profiled frozen; SGD's extra is 0 by
  construction.
- ``syncs``: host synchronisations per step: ``aten::_local_scalar_dense`` (every
  ``.item()``, ``float(t)``, ``bool(t)`` of a tensor), ``aten::nonzero``,
  ``aten::equal`` / ``aten::allclose`` (these read a result back on a GPU) and, on CUDA,
  the ``cuda*Synchronize`` runtime calls. On the CPU a read-back costs nothing, but each
  one drains the GPU queue, so they are counted where they would be issued.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from zosam.bench import emit
from zosam.cliargs import add_tracking_uri
from zosam.config import parse_value
from zosam.console import progress_bar
from zosam.models import create_model
from zosam.optim import OPTIMIZERS, PerturbationOptimizer, make_closure

DEFAULT_METHODS = [
    "sgd", "sam", "zosam:q=1", "zosam:q=2", "zosam:q=4",
    "zosam:q=1,query_fraction=0.25", "zosam:q=2,query_fraction=0.25",
]
PEERS = ["esam", "looksam", "gsam", "rwp"]


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"zosam:q=2,query_fraction=0.25"`` -> ``("zosam", {"q": 2, "query_fraction": 0.25})``."""
    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method {spec!r}: expected key=value, got {item!r}")
        kwargs[key.strip()] = parse_value(value)
    # unknown names fail here, listing the allowed ones; "sgd" stays the benchmarks' label of the base optimizer
    OPTIMIZERS.get(OPTIMIZERS.canonical(name))
    return name, kwargs


def _setup(args: argparse.Namespace, spec: str, device: torch.device):
    name, kwargs = parse_method(spec)
    model = create_model(args.model, num_classes=10, **({"width": args.width} if args.width else {})).to(device)
    model.train()
    opt: PerturbationOptimizer = OPTIMIZERS.get(OPTIMIZERS.canonical(name))(
        model.parameters(), torch.optim.SGD, model=model, lr=0.01, momentum=0.9,
        **{"compile": args.compile, **kwargs})
    g = torch.Generator().manual_seed(0)
    size = args.image_size
    x = torch.randn(args.batch_size, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16) \
        if args.amp else None
    scaler = torch.amp.GradScaler(device.type) if args.amp and device.type == "cuda" else None
    return model, opt, make_closure(model, F.cross_entropy, x, y, autocast=autocast), scaler, x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(opt, closure, scaler, device) -> float:
    _sync(device)
    t = time.perf_counter()
    opt.step(closure, scaler=scaler)
    if scaler is not None:
        scaler.update()
    _sync(device)
    return time.perf_counter() - t


def _timed_forward(model, x, device) -> float:
    _sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        model(x)
    _sync(device)
    return time.perf_counter() - t


def _memory_child(args: argparse.Namespace, spec: str) -> None:
    """Run in a subprocess: print the peak-RSS growth (MiB) of two steps of one method."""
    device = torch.device(args.device)
    _, opt, closure, scaler, _ = _setup(args, spec, device)
    _timed_step(opt, closure, scaler, device)  # optimizer state allocated, allocator warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _timed_step(opt, closure, scaler, device)
        print(json.dumps({"peak_mib": (torch.cuda.max_memory_allocated(device) - base) / 2**20}))
        return
    growth = _peak_rss_growth(lambda: _timed_step(opt, closure, scaler, device))
    print(json.dumps({"peak_mib": growth / 2**20}))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_growth(fn) -> int:
    """Peak resident set size during ``fn()`` minus the size before it, sampled every 0.5 ms."""
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], _rss()) - base


def _peak_memory(argv: Sequence[str], spec: str) -> float:
    # glibc returns large blocks to the OS at once with a fixed mmap threshold, so the
    # resident set tracks live tensor memory instead of the allocator's retained heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    proc = subprocess.run([sys.executable, "-m", "zosam.bench.step_cost", *argv, "--memory-child", spec],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory run of {spec!r} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


SYNC_EVENTS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::allclose",
               "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _profile_counts(fn, n: int) -> tuple[float, float]:
    """(top-level aten ops, host syncs) per call of ``fn``, averaged over ``n`` calls."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            fn()
    ops = syncs = 0
    for ev in prof.events():
        if ev.name in SYNC_EVENTS:
            syncs += 1
        if not ev.name.startswith("aten::"):
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        ops += parent is None
    return ops / n, syncs / n


def _pass_ops(model, opt, closure, device: torch.device) -> dict[str, float]:
    """Top-level ops of one forward with autograd (with the loss), one backward, one no-grad
    forward; the forwards with BatchNorm frozen, as the extra passes of a step run."""
    def fwd():
        with torch.enable_grad(), opt.frozen_batchnorm():
            return closure()

    def nograd():
        with torch.no_grad(), opt.frozen_batchnorm():
            closure()

    loss = [None]

    def backward():
        loss[0].backward()

    fwd(), nograd()  # warm
    out = {"fwd": _profile_counts(fwd, 3)[0], "nograd": _profile_counts(nograd, 3)[0]}
    n, total = 3, 0.0
    for _ in range(n):
        loss[0] = fwd()
        total += _profile_counts(backward, 1)[0]
        model.zero_grad(set_to_none=True)
    out["bwd"] = total / n
    _sync(device)
    return out


def count_ops(setups: dict[str, Any], steps: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Per method: ``ops``, ``extra`` and ``syncs`` per step (see the module docstring)."""
    model, sgd_opt, closure, _, _ = setups["sgd"]
    passes = _pass_ops(model, sgd_opt, closure, device)
    out: dict[str, dict[str, float]] = {}
    for m, (_, opt, cl, scaler, _) in setups.items():
        before = opt.pass_counts

        def run(opt=opt, cl=cl, scaler=scaler) -> None:
            opt.step(cl, scaler=scaler)
            if scaler is not None:
                scaler.update()

        ops, syncs = _profile_counts(run, steps)
        after = opt.pass_counts
        f, n, b = ((after[k] - before[k]) / steps for k in ("forward", "forward_no_grad", "backward"))
        out[m] = {"ops": ops, "syncs": syncs, "F": f, "N": n, "B": b}
    sgd = out["sgd"]["ops"]
    for r in out.values():
        r["extra"] = r["ops"] - sgd - (r["F"] - 1) * passes["fwd"] - r["N"] * passes["nograd"] \
            - (r["B"] - 1) * passes["bwd"]
    out["_passes"] = passes
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zosam bench step-cost", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet32")
    p.add_argument("--width", type=int, default=None, help="CIFAR ResNet width (default: the model's)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--methods", nargs="+", default=None,
                   help="method specs like sgd sam zosam:q=2,query_fraction=0.25 (default: SGD, SAM, "
                        "ZO-SAM q=1,2,4 x fraction 1, 0.25, and the peers that are registered)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, fp16 + GradScaler on CUDA)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--compile", choices=("none", "graphs"), default="none",
                   help="the optimizers' compile mode: graphs replays ZO-SAM's query passes from CUDA graphs "
                        "(methods without query passes, SGD included, run as in eager mode)")
    p.add_argument("--count-ops", action="store_true",
                   help="also count top-level aten ops, ops beyond the passes and host syncs per step")
    p.add_argument("--count-steps", type=int, default=5, help="steps profiled per method by --count-ops")
    add_tracking_uri(p, "--mlflow", dest="mlflow", help="also log to this MLflow tracking URI")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.memory_child:
        _memory_child(args, args.memory_child)
        return None
    methods = args.methods or DEFAULT_METHODS + [p for p in PEERS if p in OPTIMIZERS]
    if "sgd" not in methods:
        methods = ["sgd", *methods]
    device = torch.device(args.device)
    setups = {m: _setup(args, m, device) for m in methods}
    fractions = sorted({parse_method(m)[1].get("query_fraction", 1.0) for m in methods})
    fwd_inputs = {f: setups["sgd"][4][: max(1, math.ceil(f * args.batch_size))] for f in fractions}
    times: dict[str, list[float]] = {m: [] for m in methods}
    fwd_times: dict[float, list[float]] = {f: [] for f in fractions}
    for r in progress_bar(range(args.warmup + args.rounds), desc="step-cost", unit="round"):
        for m, (_, opt, closure, scaler, _) in setups.items():
            dt = _timed_step(opt, closure, scaler, device)
            if r >= args.warmup:
                times[m].append(dt)
        for f, x in fwd_inputs.items():
            dt = _timed_forward(setups["sgd"][0], x, device)
            if r >= args.warmup:
                fwd_times[f].append(dt)
    steps = args.warmup + args.rounds
    counted = count_ops(setups, args.count_steps, device) if args.count_ops else None
    fwd = {f: statistics.median(v) for f, v in fwd_times.items()}
    sgd = statistics.median(times["sgd"])
    rows = []
    for m in methods:
        _, opt, *_ = setups[m]
        counts = {k: v / (steps + (args.count_steps if counted else 0)) for k, v in opt.pass_counts.items()}
        med = statistics.median(times[m])
        f = parse_method(m)[1].get("query_fraction", 1.0)
        budget = sgd + counts["forward_no_grad"] * fwd[f]
        row = {"method": m, "step_s": med, "vs_sgd": med / sgd, "fwd": counts["forward"],
               "fwd_no_grad": counts["forward_no_grad"], "bwd": counts["backward"],
               "vs_budget": med / budget}
        if counted is not None:
            row.update(ops=counted[m]["ops"], extra_ops=counted[m]["extra"], syncs=counted[m]["syncs"])
        if not args.no_memory:
            row["peak_mib"] = _peak_memory(argv, m)
        rows.append(row)
    summary = {"model": args.model, "batch_size": args.batch_size, "device": args.device, "amp": args.amp,
               "compile": args.compile,
               "rounds": args.rounds, "sgd_step_s": sgd,
               **{f"forward_no_grad_s@{f:g}": t for f, t in fwd.items()},
               **({f"ops_{k}": v for k, v in counted["_passes"].items()} if counted else {})}
    return emit("step_cost", rows, summary, mlflow_uri=args.mlflow)


if __name__ == "__main__":
    main()
