"""Ray's scheduling overhead per trial on one node vs three, on the loopback stack.

The same tiny sweep (``--trials`` trials of one short epoch, two at a time, the tracking
server and S3 storage of ``zosam.bench.loopback_cluster``) runs on

- 1 node: a head with 2 logical CPUs, trials run beside Ray's services;
- 3 nodes: a CPU-less head and two 1-CPU worker nodes (each its own raylet).

Per trial, the overhead is Tune's ``time_total_s`` minus the training time the trial
measured itself (``train_time_s``): starting the trial's worker process, importing torch,
building data and model, MLflow calls, checkpoint uploads to S3, reports. Also printed:
the sweep's wall time per trial and the time to bring each stack up. All nodes share
one machine here, so this measures Ray's bookkeeping, not a network.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from zosam.bench import emit
from zosam.cliargs import add_tracking_uri

RUN = {"seed": 0, "epochs": 1, "max_steps_per_epoch": 4,
       "data": {"name": "digits", "image_size": 8, "batch_size": 32, "eval_batch_size": 512},
       "model": {"name": "mlp", "in_features": 192, "hidden": [32, 32]},
       "optimizer": {"name": "zosam", "lr": 0.1, "rho": 0.05, "mu": 1e-3, "q": 1},
       "sparse": {"method": "set", "density": 0.5, "update_interval": 2},
       "tracking": {"enabled": True, "experiment": "cluster-overhead"}}


def sweep_on(nodes: int, trials: int) -> dict[str, Any]:
    """Start a stack of ``nodes`` nodes (1 or 3), run the sweep, return its timings."""
    import ray

    from zosam.bench.loopback_cluster import loopback_cluster
    from zosam.sweep import run_sweep

    t0 = time.perf_counter()
    shape = {"num_workers": 0, "head_cpus": 2} if nodes == 1 else {"num_workers": nodes - 1, "cpus_per_worker": 1}
    with loopback_cluster(**shape) as lc:
        up = time.perf_counter() - t0
        ray.init(address=lc.address, log_to_driver=False)
        spec = {"name": f"overhead-{nodes}", "base": RUN, "space": {"optimizer.rho": {"loguniform": [0.01, 0.2]}},
                "search": {"sampler": "random", "seed": 0}, "scheduler": {"type": "none"}, "num_trials": trials,
                "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2},
                "tracking": {"experiment": "cluster-overhead"}, "storage_path": lc.storage_path,
                "storage_endpoint": lc.s3_endpoint}
        t1 = time.perf_counter()
        result = run_sweep(spec, tracking_uri=lc.tracking_uri, out=lambda s: None)
        wall = time.perf_counter() - t1
        placed = len({n["NodeID"] for n in ray.nodes() if n["Alive"]})
    over = [t["time_total_s"] - t["train_time_s"] for t in result.trials
            if t.get("time_total_s") is not None and t.get("train_time_s") is not None]
    return {"nodes": placed, "trials": len(result.trials),
            "finished": sum(t["status"] == "finished" for t in result.trials),
            "overhead median s": statistics.median(over), "overhead min s": min(over), "overhead max s": max(over),
            "sweep wall s": wall, "wall per trial s": wall / len(result.trials), "stack up s": up}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zosam bench cluster-overhead", description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 3], choices=[1, 2, 3, 4])
    add_tracking_uri(p, "--mlflow", dest="mlflow", help="also log to this MLflow tracking URI")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.trials < 1:
        raise ValueError(f"--trials={args.trials} is invalid; must be an integer >= 1")
    rows = [sweep_on(n, args.trials) for n in args.nodes]
    return emit("cluster_overhead", rows, {"trials": args.trials, "concurrent": 2}, mlflow_uri=args.mlflow)
