"""Communication per step under DDP: bytes each method reduces across ranks, counted on 2 gloo ranks.

Two CPU processes (gloo on 127.0.0.1) train the same model under
``DistributedDataParallel`` with each method for a few steps. Every collective of a
step is counted where it is issued:

- gradient all-reduces: a DDP communication hook that counts each bucket's bytes and
  then all-reduces it as DDP's default hook does (so training is unchanged);
- explicit all-reduces (ZO-SAM's query losses, one scalar per query pass): a counting
  wrapper around ``torch.distributed.all_reduce``;
- buffer broadcasts (BatchNorm statistics, which DDP sends from rank 0 before each
  training-mode forward): a counting wrapper around ``torch.distributed._broadcast_coalesced``.

The counts are exact, independent of the machine; the seconds per step are a CPU reading
of a loopback "network", not a cluster's. Expectation: SGD one gradient all-reduce, SAM
two, ZO-SAM one plus 2q scalars (central differences).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from zosam.bench import emit
from zosam.cliargs import add_tracking_uri

DEFAULT_METHODS = ["sgd", "sam", "zosam:q=1", "zosam:q=2"]


def _counting(counter: dict[str, float], prefix: str, fn):
    def wrapped(tensor_or_list, *args, **kwargs):
        tensors = tensor_or_list if isinstance(tensor_or_list, list | tuple) else [tensor_or_list]
        counter[f"{prefix}_calls"] += 1
        counter[f"{prefix}_bytes"] += sum(t.numel() * t.element_size() for t in tensors)
        return fn(tensor_or_list, *args, **kwargs)

    return wrapped


def _counting_bcast(counter: dict[str, float], fn):
    def wrapped(process_group, tensors, *args, **kwargs):
        counter["bcast_calls"] += 1
        counter["bcast_bytes"] += sum(t.numel() * t.element_size() for t in tensors)
        return fn(process_group, tensors, *args, **kwargs)

    return wrapped


def _grad_hook(counter: dict[str, float]):
    all_reduce = dist.all_reduce  # the real one: the counting wrapper is installed later

    def hook(state, bucket):
        buf = bucket.buffer()
        counter["grad_calls"] += 1
        counter["grad_bytes"] += buf.numel() * buf.element_size()
        fut = all_reduce(buf.div_(dist.get_world_size()), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    return hook


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from zosam.bench.step_cost import parse_method

    kwargs = parse_method(f"sgd:{args.model_args}")[1] if args.model_args else {}
    return {**kwargs, **({"width": args.width} if args.width else {})}


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from zosam.bench.step_cost import parse_method
    from zosam.models import create_model
    from zosam.optim import OPTIMIZERS, make_closure

    torch.set_num_threads(1)  # two ranks share the machine's cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    try:
        for spec in args.methods:
            counter = {k: 0.0 for k in ("grad_calls", "grad_bytes", "scalar_calls", "scalar_bytes",
                                        "bcast_calls", "bcast_bytes")}
            torch.manual_seed(0)  # the same initial weights on both ranks (DDP also broadcasts them)
            model = create_model(args.model, num_classes=args.num_classes, **_model_kwargs(args))
            net = DDP(model)
            net.register_comm_hook(None, _grad_hook(counter))
            name, kwargs = parse_method(spec)
            cls = OPTIMIZERS.get(OPTIMIZERS.canonical(name))
            opt = cls(model.parameters(), torch.optim.SGD, model=model, lr=0.01, momentum=0.9, **kwargs)
            g = torch.Generator().manual_seed(1 + rank)
            size = args.image_size
            x = torch.randn(args.batch_size, 3, size, size, generator=g)
            y = torch.randint(0, 10, (args.batch_size,), generator=g)
            closure = make_closure(net, F.cross_entropy, x, y)
            real_all_reduce, real_bcast = dist.all_reduce, dist._broadcast_coalesced
            dist.all_reduce = _counting(counter, "scalar", real_all_reduce)
            dist._broadcast_coalesced = _counting_bcast(counter, real_bcast)
            try:
                opt.step(closure)  # warm-up (buckets are rebuilt after the first step)
                times = []
                for k in counter:
                    counter[k] = 0.0
                for _ in range(args.steps):
                    dist.barrier()
                    t = time.perf_counter()
                    opt.step(closure)
                    times.append(time.perf_counter() - t)
            finally:
                dist.all_reduce, dist._broadcast_coalesced = real_all_reduce, real_bcast
            n = args.steps
            params = sum(p.numel() for p in model.parameters())
            rows.append({
                "method": spec,
                "grad allreduce MB": counter["grad_bytes"] / n / 1e6,
                "grad buckets": counter["grad_calls"] / n,
                "scalar allreduces": counter["scalar_calls"] / n,
                "scalar bytes": counter["scalar_bytes"] / n,
                "buffer bcast MB": counter["bcast_bytes"] / n / 1e6,
                "total MB": (counter["grad_bytes"] + counter["scalar_bytes"] + counter["bcast_bytes"]) / n / 1e6,
                "grads / params": counter["grad_bytes"] / n / (params * 4),
                "step s": statistics.median(times),
            })
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps({"rows": rows, "parameters": params}))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zosam bench ddp-comm", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet32")
    p.add_argument("--width", type=int, default=None, help="CIFAR ResNet width (default: the model's)")
    p.add_argument("--model-args", default="", metavar="K=V,...",
                   help="model constructor arguments, e.g. img_size=32,patch_size=4 for a small DeiT input")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    add_tracking_uri(p, "--mlflow", dest="mlflow", help="also log to this MLflow tracking URI")
    return p


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the two ranks; rank 0's rows and the model's parameter count (counts are alike on both ranks)."""
    import torch.multiprocessing as mp

    from zosam.bench.loopback_cluster import free_port
    from zosam.bench.step_cost import parse_method

    for m in args.methods:
        parse_method(m)  # unknown methods fail before any process starts
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.spawn(_rank, args=(2, free_port(), args, out), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    got = measure(args)
    return emit("ddp_comm", got["rows"], {"model": args.model, "model_args": args.model_args,
                                          "num_classes": args.num_classes, "parameters": got["parameters"], "ranks": 2,
                                          "backend": "gloo", "batch_size_per_rank": args.batch_size,
                                          "steps": args.steps},
                mlflow_uri=args.mlflow)
