"""Flatness: does a method do what SAM does? Label noise, curvature, gradient variance, cost.

The decisive test of the ZO-SAM claim. Training labels get symmetric noise (``data.label_noise``:
a fixed fraction of the training labels replaced by another class, drawn by a dedicated
generator seeded with ``data.label_noise_seed`` = the run seed; the test labels stay
clean). Models that can fit their training labels memorise the noise under SGD; SAM
resists it (Foret et al. 2021), so the test accuracy gained over SGD measures whether a
method does what SAM does. Every run goes through the project's own machinery
(``RunConfig`` -> ``zosam.engine.Trainer`` -> ``OptimizerConfig.build`` from the
``OPTIMIZERS`` registry), so any registered optimizer and hyperparameters work:
``--methods sgd sam zosam:q=4 zosam:directions=guided rwp``.

Settings (``SETTINGS``; ``key=value`` arguments override any run-config field of all of them):

- ``digits``: scikit-learn digits at 8x8 (1,438 training, 359 test images), an MLP
  192-256-256-10, 40 epochs, batch 64, SGD momentum 0.9, lr 0.1 cosine, wd 5e-4, no
  augmentation (dense).
- ``digits-sparse``: the same MLP at 90 % sparsity: a fixed random mask, ERK layer
  densities over both hidden layers (classifier dense).
- ``cifar``: the CIFAR-10 JPEG copy, a fixed class-balanced subset of 2,000 training and
  1,000 test images, a LeNet-shaped CNN (width 8, 128 hidden), 20 epochs, lr 0.05, no
  augmentation.

Grid: settings x noise x methods x rho (the rho grid for every method that takes a
radius, ``rho`` or GSAM's ``rho_max``, and does not fix it in its spec) x seeds; noise,
methods and rho grid are the setting's unless ``--noise``, ``--methods``, ``--rho`` set
them for all (digits settings: noise 0/0.2/0.4/0.6, ten methods, rho 0.1/0.3; cifar: noise
0/0.4, seven methods, rho 0.05). Per run, after
training: final test accuracy; accuracy on the (noisy) training labels and the fraction
of flipped samples the model predicts with their noisy label (memorisation); the top
Hessian eigenvalue of the training loss on a fixed set of training samples (power
iteration with Hessian-vector products, double backward); the SAM-loss gap at
``--gap-rho`` on the same samples, ``L(w + rho g / ||g||) - L(w)`` with g the gradient
there (both restricted to active weights on a sparse host, model in eval mode); the
variance of mini-batch gradients at fixed weights at checkpoints along training
(``--variance-at``: fractions of the epochs; the trace of the covariance of
``--variance-batches`` gradients of training-batch size, drawn by a fixed generator);
passes per step from ``pass_counts`` and seconds per step (training time only).

Aggregation: per (setting, noise, method, rho), over seeds: mean, sample std (ddof 1)
and 95 % interval (Student t) of the test accuracy, the gain over SGD, the means of the
other measures. The decision (``decide``), per setting and noise: SAM's gain over SGD
(SAM at its best rho), decisive when that gain is at least ``3 x max(std_SGD, std_SAM)``
(a setting where SAM gains nothing decides nothing), and every method's fraction of SAM's
gain closed (each method at its best rho); ``--judge`` (default guided ZO-SAM) passes on
a setting when its fraction reaches the setting's target (0.8 dense, 0.6 sparse) with one
backward pass per step. Choosing each method's best rho on the test set is optimistic
for every method alike (every method gets the same grid).

Outputs in ``--out``: ``runs/<key>.json`` per run (reused when the config matches, so an
interrupted benchmark continues; ``--fresh`` reruns), ``flatness_results.json``,
``flatness_table.md`` / ``.csv`` (one row per cell), ``flatness_decision.md`` / ``.csv``,
``flatness_gain_vs_cost.png``, ``flatness_acc_vs_eigenvalue.png``; with
``--tracking-uri`` all of it is logged to MLflow (experiment ``zosam-benchmarks``).

Default (every setting with its grid, 5 seeds: 830 runs): estimated at 30 to 40 minutes
on a quiet 2-core CPU with ``--jobs 2`` (an MLP run takes about 2 s, a LeNet run about
12 s, times the method's cost per step relative to SGD). ``--quick``: digits only, noise 0
and 0.4, 2 seeds, 10 epochs, sgd/sam/zosam/rwp at rho 0.3 (about a minute).

This module is the command (flags, reuse of recorded runs, worker processes); the parts:
``flatness_grid`` (settings, run configs), ``flatness_measures`` (curvature, SAM-loss gap,
gradient variance), ``flatness_run`` (one training and its measures), ``flatness_aggregate``
(over seeds, the decision), ``flatness_report`` (tables, plots, the record).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from zosam.bench.flatness_aggregate import aggregate, best_rows, decide
from zosam.bench.flatness_grid import (
    BASELINE,
    DEFAULT_METHODS,
    GUIDED,
    QUICK,
    REFERENCE,
    SETTINGS,
    grid,
    method_label,
    radius_param,
    run_config,
)
from zosam.bench.flatness_measures import gradient_variance, hessian_vector_product, sam_gap, top_hessian_eigenvalue
from zosam.bench.flatness_report import RESULTS_FILE, decision_text, write_report
from zosam.bench.flatness_run import run_one
from zosam.cliargs import add_key_values, parse_args
from zosam.console import eprint, progress_bar
from zosam.validate import choice, in_range

__all__ = [
    "BASELINE", "GUIDED", "REFERENCE", "RESULTS_FILE", "SETTINGS", "aggregate", "best_rows", "build_parser",
    "decide", "decision_text", "gradient_variance", "grid", "hessian_vector_product", "main", "method_label",
    "radius_param", "run_config", "run_one", "sam_gap", "top_hessian_eigenvalue",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zosam bench flatness", description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=None, help=f"default: all of {', '.join(SETTINGS)}")
    p.add_argument("--noise", nargs="+", type=float, default=None,
                   help="label-noise rates for every setting (default: the setting's; 0 0.2 0.4 0.6 for digits)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="optimizer specs, name[:key=value,...], for every setting (default: the setting's; "
                        "digits: " + " ".join(DEFAULT_METHODS) + ")")
    p.add_argument("--rho", nargs="+", type=float, default=None,
                   help="rho grid for methods that take rho and do not set it (default: the setting's; "
                        "digits 0.1 0.3, cifar 0.05)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 5)")
    add_key_values(p, help="override a run-config field in every setting, e.g. epochs=5")
    p.add_argument("--quick", action="store_true",
                   help="digits, noise 0 and 0.4, 2 seeds, 10 epochs, sgd sam zosam rwp at rho 0.3 "
                        "(explicit flags still win)")
    p.add_argument("--judge", default=GUIDED, help="the method judged against the targets (default: guided ZO-SAM)")
    p.add_argument("--gap-rho", type=float, default=0.1, help="radius of the SAM-loss gap (same for every method)")
    p.add_argument("--hessian-samples", type=int, default=256, help="training samples of the curvature measures")
    p.add_argument("--hessian-iters", type=int, default=20, help="power-iteration steps (at most)")
    p.add_argument("--variance-batches", type=int, default=10, help="mini-batches per gradient-variance estimate")
    p.add_argument("--variance-at", nargs="+", type=float, default=[0.25, 0.5, 1.0],
                   help="checkpoints of the gradient variance, as fractions of the epochs")
    p.add_argument("--jobs", type=int, default=2, help="runs trained in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="bench_results/flatness")
    p.add_argument("--fresh", action="store_true", help="rerun runs already recorded in --out")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: aggregate the runs of the grid already recorded in --out (says how many "
                        "are missing)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI: log the table, plots and records there")
    return p


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Flags over the settings' defaults (``--quick`` changes the defaults; explicit flags still win)."""
    q = QUICK if args.quick else {}
    settings = args.settings or q.get("settings") or list(SETTINGS)
    for s in settings:
        choice("--settings", s, tuple(SETTINGS))
    plan = {s: {k: getattr(args, k) or q.get(k) or SETTINGS[s][k] for k in ("noise", "methods", "rho")}
            for s in settings}
    return {"plan": plan, "seeds": args.seeds if args.seeds is not None else q.get("seeds", 5),
            "overrides": [*q.get("overrides", []), *args.overrides]}


def _job_id(job: dict[str, Any]) -> str:
    text = json.dumps({"config": job["config"], "measure": job["measure"]}, sort_keys=True)
    return job["config"]["name"] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), list(sys.argv[1:] if argv is None else argv))
    from zosam.config import RunConfig

    g = _resolve(args)
    for p in g["plan"].values():
        for n in p["noise"]:
            in_range("--noise", n, 0, 1, high_open=True)
        for r in p["rho"]:
            in_range("--rho", r, 0, low_open=True)
    in_range("--seeds", g["seeds"], 1, integer=True)
    in_range("--gap-rho", args.gap_rho, 0, low_open=True)
    in_range("--hessian-samples", args.hessian_samples, 1, integer=True)
    in_range("--hessian-iters", args.hessian_iters, 1, integer=True)
    in_range("--variance-batches", args.variance_batches, 2, integer=True)
    for f in args.variance_at:
        in_range("--variance-at", f, 0, 1, low_open=True)
    in_range("--jobs", args.jobs, 1, integer=True)
    in_range("--threads", args.threads, 1, integer=True)
    measure = {"hessian_samples": args.hessian_samples, "hessian_iters": args.hessian_iters,
               "gap_rho": args.gap_rho, "variance_batches": args.variance_batches,
               "variance_at": list(args.variance_at)}
    jobs = grid(g["plan"], g["seeds"], g["overrides"], args.device)
    for j in jobs:  # every run config is valid before the first run starts
        RunConfig.from_dict(j["config"])
        j.update(measure=measure, threads=args.threads)
    out = Path(args.out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for j in jobs:
        jid = _job_id(j)
        f = out / "runs" / f"{jid}.json"
        if not args.fresh and f.is_file():
            old = json.loads(f.read_text())
            if old.get("status") == "finished":
                records[jid] = old
                continue
        todo.append((jid, j))
    if args.report_only:
        print(f"flatness: report only: {len(jobs) - len(todo)} of {len(jobs)} runs recorded in {out}, "
              f"{len(todo)} missing (not trained)", flush=True)
        todo = []
    else:
        print(f"flatness: {len(jobs)} runs ({len(jobs) - len(todo)} reused), {args.jobs} at a time, "
              f"{args.threads} thread(s) each -> {out}", flush=True)
    t0 = time.perf_counter()
    _train_all(todo, records, out, args.jobs, t0)
    ordered = [records[_job_id(j)] for j in jobs if _job_id(j) in records]
    g["planned_runs"] = len(jobs)
    return write_report(ordered, g, args, out, time.perf_counter() - t0, measure)


def _train_all(todo: list[tuple[str, dict[str, Any]]], records: dict[str, dict[str, Any]], out: Path, jobs: int,
               t0: float) -> None:
    def done(jid: str, rec: dict[str, Any], i: int) -> None:
        records[jid] = rec
        (out / "runs" / f"{jid}.json").write_text(json.dumps(rec, indent=1, default=str))
        acc = f"test {100 * rec['test_acc']:.1f} %  top eig {rec['top_eig']:.3g}" if rec["status"] == "finished" \
            else f"FAILED: {rec['reason']}"
        eprint(f"[{time.perf_counter() - t0:6.0f}s] {i}/{len(todo)} {rec['config']['name']}: {acc}")
        bar.update()
        if i == len(todo):
            bar.close()

    if not todo:
        return
    bar = progress_bar(total=len(todo), desc="flatness", unit="run")
    if jobs == 1 or len(todo) <= 1:
        for i, (jid, j) in enumerate(todo, 1):
            done(jid, run_one(j), i)
        return
    import multiprocessing as mp

    # spawn: a forked child would inherit the parent's OpenMP thread pool state.
    with ProcessPoolExecutor(max_workers=min(jobs, os.cpu_count() or 1, len(todo)),
                             mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_one, j): jid for jid, j in todo}
        for i, fut in enumerate(as_completed(futures), 1):
            done(futures[fut], fut.result(), i)


if __name__ == "__main__":
    main()
