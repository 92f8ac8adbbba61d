"""Benchmark: the cost of sparse training's bookkeeping, relative to one SGD step.

For ResNet-32 (2x wide, CIFAR-shaped input) at each density it measures

- ``apply``: re-applying the masks after an optimizer step (``zosam.optim.apply_masks``
  on the optimizer's masks), which every sparse step pays;
- ``update``: one mask update of each dynamic host (``Masking.step`` on an update step:
  scores, drop/grow, zeroing, optimizer-state reset, pushing masks to the optimizer),
  paid once every ``update_interval`` steps;

each as a fraction of one dense SGD step (forward, backward and momentum update through
``zosam.optim.FirstOrder``, without masks). Targets: apply < 3 % of an SGD step, a RigL
update < 1 SGD step. Prints a table, then one JSON line.

Run: ``python benchmarks/sparse_overhead.py`` (or ``zosam bench sparse``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from zosam.tables import text_table

APPLY_TARGET = 0.03  # mask application, as a fraction of an SGD step
RIGL_TARGET = 1.0  # one RigL update, in SGD steps


def _time(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in seconds (synchronising CUDA around each call)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet32")
    p.add_argument("--width", type=int, default=32, help="ResNet base width (32 = 2x wide)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.02])
    p.add_argument("--methods", nargs="+", default=["rigl", "set", "mest"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (median)")
    p.add_argument("--update-repeats", type=int, default=10)
    p.add_argument("--apply-repeats", type=int, default=50, help="mask applications (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: keep)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure and return the results (the JSON line's content)."""
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _measure(args)
    finally:
        torch.set_num_threads(threads)


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    from zosam.models import create_model
    from zosam.optim import FirstOrder, apply_masks, make_closure
    from zosam.sparse import Masking, SparsityConfig

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)

    def build() -> tuple[torch.nn.Module, FirstOrder]:
        model = create_model(args.model, num_classes=10, width=args.width).to(device)
        opt = FirstOrder(model.parameters(), torch.optim.SGD, model=model, lr=0.1, momentum=0.9)
        return model, opt

    model, opt = build()
    closure = make_closure(model, F.cross_entropy, x, y)
    sgd_s = _time(lambda: opt.step(closure), args.repeats, args.warmup, device)

    rows = []
    for density in args.densities:
        row: dict[str, Any] = {"density": density, "update_s": {}, "update_frac": {}}
        for method in args.methods:
            model, opt = build()
            # Constant drop fraction (0.3): every timed update is a full-size one.
            cfg = SparsityConfig(
                method=method,
                density=density,
                update_interval=1,
                drop_schedule="constant",
                end_fraction=1.0,
            )
            total = args.update_repeats + args.warmup + 10
            masking = Masking(model, cfg, total_steps=total, input_shape=(3, 32, 32))
            masking.init_masks()
            masking.attach(opt)
            opt.step(make_closure(model, F.cross_entropy, x, y))  # dense gradients for RigL
            if "apply_s" not in row:
                masks = opt.masks  # what the optimizer applies after every step
                row["apply_s"] = _time(
                    lambda masks=masks: apply_masks(masks), args.apply_repeats, args.warmup, device
                )
                row["apply_frac"] = row["apply_s"] / sgd_s
                row["realised_density"] = masking.report()["global_density"]
            steps = iter(range(total))
            row["update_s"][method] = _time(
                lambda m=masking, s=steps: m.step(next(s)), args.update_repeats, args.warmup, device
            )
            row["update_frac"][method] = row["update_s"][method] / sgd_s
        rows.append(row)
    ok = all(r["apply_frac"] < APPLY_TARGET for r in rows) and all(
        r["update_frac"].get("rigl", 0.0) < RIGL_TARGET for r in rows
    )
    return {
        "benchmark": "sparse_overhead",
        "model": args.model,
        "width": args.width,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "sgd_step_s": sgd_s,
        "results": rows,
        "targets": {"apply_frac_max": APPLY_TARGET, "rigl_update_frac_max": RIGL_TARGET},
        "meets_targets": ok,
    }


def format_table(res: dict[str, Any]) -> str:
    methods = list(res["results"][0]["update_s"]) if res["results"] else []
    header = ["sparsity", "apply ms", "apply/SGD"]
    for m in methods:
        header += [f"{m} ms", f"{m}/SGD"]
    rows = []
    for r in res["results"]:
        row = [f"{1 - r['density']:.0%}", f"{r['apply_s'] * 1e3:.3f}", f"{r['apply_frac']:.2%}"]
        for m in methods:
            row += [f"{r['update_s'][m] * 1e3:.2f}", f"{r['update_frac'][m]:.3f}"]
        rows.append(row)
    return "\n".join([
        f"{res['model']} (width {res['width']}) on {res['device']}, {res['threads']} threads, "
        f"batch {res['batch_size']}: SGD step {res['sgd_step_s'] * 1e3:.1f} ms",
        text_table(header, rows, align=">" * len(header)),
        f"targets: apply < {APPLY_TARGET:.0%} of an SGD step, RigL update < {RIGL_TARGET:g} "
        f"SGD step: {'met' if res['meets_targets'] else 'NOT met'}",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table and one JSON line; returns 0."""
    res = run(parse_args(argv))
    print(format_table(res))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
