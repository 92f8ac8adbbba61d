"""Accuracy: a reduced version of the paper's main table, every cell trained for real.

Grid: hosts x optimizers x densities x seeds (default SNIP, RigL x SGD, SAM, ZO-SAM, RWP
x 10 %, 2 % density x 2 seeds), the same data, model, epochs, schedule and seeds for
every cell. Each run goes through ``zosam.runner.run`` (its own checkpoint folder under
``--out/runs/<name>``, one MLflow run tagged ``zosam.benchmark=accuracy`` plus the usual
``zosam.*`` tags, so ``zosam compare zosam.benchmark=accuracy`` reads them).

Reported per cell (host, optimizer, density): final-epoch test accuracy mean, sample std
over seeds (ddof = 1; empty with one seed), min and max, the change against the host
alone (SGD) at the same density, total training time over seeds and backward/forward
passes per run. ``--out/accuracy_results.json`` holds every run's summary, its per-epoch
test accuracy and epoch times, and its checkpoint path: ``zosam bench robustness`` and
``zosam bench convergence`` read it.

Reduced default (this 2-core CPU, about 40 minutes; see ``estimate_seconds``): the JPEG
copy of CIFAR-10, a fixed class-balanced subset of 3,000 training and 1,000 test images,
ResNet-20 at width 8 (stage widths 8/16/32, 69 k weights: ResNet-32 at width 32 is about
10x the cost per image), 6 epochs at batch 64, lr 0.1 cosine, RigL updates every 20
steps. Runs already recorded in ``--out/runs/<name>.json`` with the same config are
reused, so an interrupted benchmark continues where it stopped (``--fresh`` reruns all).

``--full``: the paper's protocol (whole training set, ResNet-32 width 32, 160 epochs,
batch 128, 3 seeds, RigL updates every 100 steps). In-process (``--device cuda`` on a GPU
machine) it trains the grid one run after another and writes the same results file.
With ``--sweep`` it instead writes one sweep spec per optimizer to ``--out/sweeps/`` (a
grid over host x density x seed, listed in ``search.points_to_evaluate`` with
``num_trials`` equal to the grid size, so Optuna evaluates exactly those points; no
scheduler, so no trial stops early) and runs them with ``zosam.sweep.run_sweep`` on
``--address`` (a Ray cluster). One spec per optimizer because the optimizers take
different hyperparameters (SGD has no ``rho``), which a single ``optimizer.name`` choice
could not express.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zosam.bench import emit
from zosam.bench.accuracy_aggregate import COLUMNS, aggregate
from zosam.console import eprint, progress_bar
from zosam.optim import OPTIMIZERS

RESULTS_FILE = "accuracy_results.json"
EXPERIMENT = "zosam-accuracy"

#: Optimizer-specific hyperparameters; everything else (lr, momentum, wd) is shared.
OPTIMIZER_HYPER: dict[str, dict[str, Any]] = {
    "sgd": {},
    "sam": {"rho": 0.05},
    "zosam": {"rho": 0.05, "mu": 1.0e-3, "q": 1},
    "rwp": {"rho": 0.05},  # the same radius as ZO-SAM: RWP is its unsigned ablation
}

REDUCED = {"epochs": 6, "train_subset": 3000, "test_subset": 1000, "model": "resnet20", "width": 8,
           "batch_size": 64, "lr": 0.1, "seeds": 2, "update_interval": 20}
FULL = {"epochs": 160, "train_subset": None, "test_subset": None, "model": "resnet32", "width": 32,
        "batch_size": 128, "lr": 0.1, "seeds": 3, "update_interval": 100}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zosam bench accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the paper's protocol (see the module docstring)")
    p.add_argument("--sweep", action="store_true", help="with --full: run the grid as sweeps on a Ray cluster")
    p.add_argument("--address", default=None, help="with --sweep: Ray address (default: a local Ray)")
    p.add_argument("--dataset", default="cifar10-jpeg")
    p.add_argument("--epochs", type=int, default=None, help=f"default {REDUCED['epochs']} (--full {FULL['epochs']})")
    p.add_argument("--train-subset", type=int, default=None,
                   help=f"class-balanced training images (default {REDUCED['train_subset']}; 0 = all)")
    p.add_argument("--test-subset", type=int, default=None,
                   help=f"class-balanced test images (default {REDUCED['test_subset']}; 0 = all)")
    p.add_argument("--model", default=None, help=f"default {REDUCED['model']} (--full {FULL['model']})")
    p.add_argument("--width", type=int, default=None,
                   help=f"CIFAR ResNet width (default {REDUCED['width']}; --full {FULL['width']}; 0 = the model's)")
    p.add_argument("--hosts", nargs="+", default=["snip", "rigl"])
    p.add_argument("--optimizers", nargs="+", default=["sgd", "sam", "zosam", "rwp"])
    p.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.02])
    p.add_argument("--seeds", type=int, default=None, help=f"seeds 0..N-1 (default {REDUCED['seeds']})")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--update-interval", type=int, default=None, help="dynamic hosts' mask update interval")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap (smoke tests)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--out", default="bench_results/accuracy")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow URI (default: sqlite in --out); 'off' logs nothing (a machine without mlflow)")
    p.add_argument("--experiment", default=EXPERIMENT)
    p.add_argument("--fresh", action="store_true", help="rerun runs already recorded in --out")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return p


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved protocol: flags over the reduced (or ``--full``) defaults."""
    base = FULL if args.full else REDUCED
    out = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in base.items()}
    for k in ("train_subset", "test_subset", "width"):
        if out[k] == 0:
            out[k] = None
    if args.max_steps_per_epoch is not None:
        out["max_steps_per_epoch"] = args.max_steps_per_epoch
    return out


def run_config(s: dict[str, Any], *, dataset: str, host: str, optimizer: str, density: float, seed: int,
               device: str = "auto", amp: str = "off", experiment: str = EXPERIMENT) -> dict[str, Any]:
    """The run-config mapping of one cell and seed (validated by ``RunConfig.from_dict``)."""
    from zosam.validate import choice

    choice("optimizer", optimizer, tuple(OPTIMIZER_HYPER))
    model: dict[str, Any] = {"name": s["model"]}
    if s.get("width"):
        model["width"] = s["width"]
    arch = f"{s['model']}w{s['width']}" if s.get("width") else s["model"]
    name = f"acc-{dataset}-{arch}-{host}-{optimizer}-d{density:g}-s{seed}"
    return {
        "name": name,
        "seed": seed,
        "epochs": s["epochs"],
        "device": device,
        "amp": amp,
        "max_steps_per_epoch": s.get("max_steps_per_epoch"),
        "data": {"name": dataset, "train_subset": s["train_subset"], "test_subset": s["test_subset"],
                 "batch_size": s["batch_size"], "eval_batch_size": 500},
        "model": model,
        # "sgd" is the benchmarks' label for the base optimizer (SGD with momentum) alone
        "optimizer": {"name": OPTIMIZERS.canonical(optimizer), "base": "sgd", "lr": s["lr"], "momentum": 0.9,
                      "weight_decay": 5.0e-4, **OPTIMIZER_HYPER[optimizer]},
        "sparse": {"method": host, "distribution": "erk", "density": density,
                   "update_interval": s["update_interval"], "drop_fraction": 0.3, "drop_schedule": "cosine",
                   "end_fraction": 0.75},
        "eval": {"every": 1},  # convergence needs the test accuracy after every epoch
        "checkpoint": {"every": s["epochs"]},  # the final model only (robustness reads it)
        "tracking": {"experiment": experiment},
    }


def grid(args: argparse.Namespace, s: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run of the benchmark, seed-major so an interrupted run leaves whole seeds."""
    return [run_config(s, dataset=args.dataset, host=h, optimizer=o, density=d, seed=seed, device=args.device,
                       amp=args.amp, experiment=args.experiment)
            for seed in range(s["seeds"]) for d in args.densities for h in args.hosts for o in args.optimizers]


def train_one(cfg_dict: dict[str, Any], out: Path, tracking_uri: str, *, fresh: bool = False,
              log=eprint) -> dict[str, Any]:
    """Train one run (or reuse its record); returns the record written to ``runs/<name>.json``."""
    from zosam.config import RunConfig
    from zosam.runner import run

    record_file = out / "runs" / f"{cfg_dict['name']}.json"
    if not fresh and record_file.is_file():
        old = json.loads(record_file.read_text())
        if old.get("config") == cfg_dict and old.get("status") == "finished":
            return old
    cfg = RunConfig.from_dict(cfg_dict)
    ckpt_dir = out / "runs" / cfg.name
    histories: list[dict[str, Any]] = []

    def on_epoch(trainer, res, path, logger) -> None:
        histories.append({"epoch": res.epoch + 1, "test_acc": res.test_acc, "train_loss": res.train_loss,
                          "epoch_time_s": res.epoch_time_s})

    t0 = time.perf_counter()
    outcome = run(cfg, checkpoint_dir=ckpt_dir, tracking_uri=tracking_uri, on_epoch=on_epoch, log=log,
                  report=eprint, extra_tags={"zosam.benchmark": "accuracy"})  # a run's table is progress here
    record = {
        "name": cfg.name, "status": outcome.status, "reason": outcome.reason, "run_id": outcome.run_id,
        "host": cfg.sparse.method, "optimizer": cfg.optimizer.name, "density": cfg.sparse.density,
        "seed": cfg.seed, "summary": outcome.summary, "history": histories,
        "checkpoint": str(outcome.checkpoint) if outcome.checkpoint else None,
        "elapsed_s": time.perf_counter() - t0, "config": cfg_dict,
    }
    record_file.parent.mkdir(parents=True, exist_ok=True)
    record_file.write_text(json.dumps(record, indent=1, default=str))
    return record


def estimate_seconds(s: dict[str, Any], n_runs_per_optimizer: dict[str, int], sgd_step_s: float,
                     cost: dict[str, float] | None = None) -> float:
    """Rough duration: steps x SGD step time x each optimizer's cost relative to SGD.

    ``cost`` defaults to SAM 2, ZO-SAM 1.75 (two no-grad forwards, each about 0.37 of an
    SGD step on this CPU), RWP 1.1 (one extra direction draw) - the measured CPU ratios.
    """
    cost = cost or {"sgd": 1.0, "sam": 2.0, "zosam": 1.75, "rwp": 1.1}
    steps = s["epochs"] * math.ceil((s["train_subset"] or 50000) / s["batch_size"])
    return sum(n * steps * sgd_step_s * cost.get(o, 2.0) for o, n in n_runs_per_optimizer.items())


# -- the --full sweep -----------------------------------------------------------------------------
def sweep_specs(args: argparse.Namespace, s: dict[str, Any]) -> list[dict[str, Any]]:
    """One sweep spec per optimizer: an exact grid over host x density x seed.

    Every grid point is listed in ``search.points_to_evaluate`` and ``num_trials`` equals
    the grid size, so the sampler never draws a point of its own; ``scheduler: none``
    lets every trial run its full epochs.
    """
    specs = []
    for opt in args.optimizers:
        base = run_config(s, dataset=args.dataset, host=args.hosts[0], optimizer=opt, density=args.densities[0],
                          seed=0, device=args.device, amp=args.amp, experiment=args.experiment + "-full")
        base["checkpoint"] = {"every": 10}
        points = [{"sparse.method": h, "sparse.density": d, "seed": seed}
                  for h in args.hosts for d in args.densities for seed in range(s["seeds"])]
        specs.append({
            "name": f"accuracy-full-{opt}",
            "description": f"paper table grid, optimizer {opt}: host x density x seed",
            "base": {k: v for k, v in base.items() if k != "name"},
            "space": {"sparse.method": {"choice": list(args.hosts)},
                      "sparse.density": {"choice": list(args.densities)},
                      "seed": {"choice": list(range(s["seeds"]))}},
            "objectives": [{"metric": "test_acc", "mode": "max"}],
            "search": {"sampler": "random", "seed": 0, "points_to_evaluate": points},
            "scheduler": {"type": "none"},
            "num_trials": len(points),
            "resources": {"cpus_per_trial": 4, "gpus_per_trial": 1 if args.device == "cuda" else 0,
                          "workers_per_trial": 0, "max_concurrent_trials": 8},
            "tracking": {"experiment": args.experiment + "-full"},
        })
    return specs


def _run_sweeps(args: argparse.Namespace, s: dict[str, Any], out: Path, uri: str) -> dict[str, Any]:
    import yaml

    from zosam.sweep import run_sweep

    folder = out / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    done = []
    for spec in sweep_specs(args, s):
        path = folder / f"{spec['name']}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        print(f"sweep spec: {path}  (zosam sweep {path} --address <ray> --tracking-uri <mlflow>)", flush=True)
        result = run_sweep(spec, address=args.address, tracking_uri=uri, storage_path=str(out / "ray_results"),
                           resume=(out / "ray_results" / spec["name"]).exists())
        done.append({"sweep": spec["name"], "completed": result.completed, "trials": len(result.trials)})
    print(f"compare: zosam compare --experiment {args.experiment}-full --tracking-uri {uri}")
    return {"sweeps": done}


# -- main ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from zosam.validate import choice, in_range

    for o in args.optimizers:
        choice("--optimizers", o, tuple(OPTIMIZER_HYPER))
    for d in args.densities:
        in_range("--densities", d, 0, 1, low_open=True)
    s = settings(args)
    in_range("--seeds", s["seeds"], 1, integer=True)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking = args.tracking_uri != "off"
    uri = args.tracking_uri if args.tracking_uri and tracking else f"sqlite:///{out / 'mlflow.db'}"
    if args.sweep:
        return _run_sweeps(args, s, out, uri)
    configs = grid(args, s)
    from zosam.config import RunConfig

    for c in configs:  # every config is valid before the first run starts
        c["tracking"]["enabled"] = tracking
        RunConfig.from_dict(c)
    records = []
    t0 = time.perf_counter()
    for i, c in enumerate(progress_bar(configs, desc="accuracy", unit="run")):
        eprint(f"[{time.perf_counter() - t0:7.0f}s] run {i + 1}/{len(configs)}: {c['name']}")
        rec = train_one(c, out, uri, fresh=args.fresh, log=None if args.quiet else eprint)
        records.append(rec)
        _write_results(out, args, s, records)
    rows = aggregate(records)
    summary = {"dataset": args.dataset, "model": s["model"], "width": s.get("width"), "epochs": s["epochs"],
               "train_subset": s["train_subset"], "test_subset": s["test_subset"], "batch_size": s["batch_size"],
               "seeds": s["seeds"], "device": args.device, "amp": args.amp, "full": args.full,
               "runs": len(records), "failed": sum(r["status"] != "finished" for r in records),
               "wall_time_s": time.perf_counter() - t0, "results": str(out / RESULTS_FILE)}
    return emit("accuracy", rows, summary, mlflow_uri=uri if tracking else None, columns=COLUMNS)


def read_results(path: str | Path) -> dict[str, Any]:
    """The results file this benchmark writes (``--out/accuracy_results.json``), for the
    benchmarks that read it (convergence, robustness)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--results {str(path)!r} does not exist; run zosam bench accuracy first")
    return json.loads(path.read_text())


def _write_results(out: Path, args: argparse.Namespace, s: dict[str, Any], records: list[dict[str, Any]]) -> None:
    data = {"benchmark": "accuracy", "dataset": args.dataset, "settings": copy.deepcopy(s),
            "tracking_uri": args.tracking_uri or f"sqlite:///{out / 'mlflow.db'}",
            "records": records, "rows": aggregate(records)}
    tmp = out / (RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(out / RESULTS_FILE)


if __name__ == "__main__":
    main()
