"""Flatness: does a method do what SAM does? Label noise, curvature, gradient variance, cost.

The decisive test of issue 15. Training labels get symmetric noise (``data.label_noise``:
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
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zosam.bench import emit
from zosam.bench.accuracy import mean_std
from zosam.bench.step_cost import parse_method
from zosam.cliargs import add_key_values, parse_args
from zosam.console import eprint, progress_bar
from zosam.validate import choice, in_range

RESULTS_FILE = "flatness_results.json"
BASELINE, REFERENCE = "sgd", "sam"
GUIDED = "zosam:directions=guided"

_COMMON_OPT = {"base": "sgd", "momentum": 0.9, "weight_decay": 5.0e-4}
NOISE = [0.0, 0.2, 0.4, 0.6]
DEFAULT_METHODS = ["sgd", "sam", "zosam", GUIDED, "rwp", "asyncsam", "msam", "esam", "looksam", "gsam"]
_DIGITS = {"data": {"name": "digits", "image_size": 8, "augment": False, "batch_size": 64, "eval_batch_size": 1000},
           "model": {"name": "mlp", "in_features": 192, "hidden": [256, 256]}, "epochs": 40, "lr": 0.1,
           "noise": NOISE, "methods": DEFAULT_METHODS, "rho": [0.1, 0.3]}
#: The benchmark's settings: run-config pieces, the default grid (noise, methods, rho; the
#: flags replace them for every setting), the label printed, and the judged target fraction.
SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {**_DIGITS, "sparse": {"method": "dense"}, "target": 0.8,
               "label": "digits 8x8, MLP 192-256-256-10, dense"},
    "digits-sparse": {**_DIGITS, "target": 0.6, "label": "digits 8x8, MLP, 90 % sparse (random ERK mask)",
                      "sparse": {"method": "random", "distribution": "erk", "density": 0.1,
                                 "dense_first_layer": False, "dense_classifier": True}},
    # A CNN step costs about 10x an MLP step here: fewer cells by default, and a smaller rho
    # (SAM at rho 0.2 does not train this model: 10 % test accuracy).
    "cifar": {"data": {"name": "cifar10-jpeg", "train_subset": 2000, "test_subset": 1000, "augment": False,
                       "batch_size": 64, "eval_batch_size": 500},
              "model": {"name": "lenet", "width": 8, "hidden": 128}, "epochs": 20, "lr": 0.05,
              "sparse": {"method": "dense"}, "target": 0.8, "noise": [0.0, 0.4], "rho": [0.05],
              "methods": ["sgd", "sam", "zosam", GUIDED, "rwp", "asyncsam", "msam"],
              "label": "CIFAR-10 JPEG copy, 2,000-image subset, LeNet (width 8)"},
}
QUICK = {"settings": ["digits"], "noise": [0.0, 0.4], "seeds": 2, "methods": ["sgd", "sam", "zosam", "rwp"],
         "rho": [0.3], "overrides": ["epochs=10"]}


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


# -- the grid ---------------------------------------------------------------------------------------
def radius_param(name: str) -> str | None:
    """The optimizer's perturbation radius: ``rho``, else ``rho_max`` (GSAM's scheduled radius), else None."""
    from zosam.optim import OPTIMIZERS

    params = inspect.signature(OPTIMIZERS.get(name)).parameters
    return next((k for k in ("rho", "rho_max") if k in params), None)


def method_label(name: str, kwargs: dict[str, Any]) -> str:
    """``zosam`` + ``{"directions": "guided"}`` -> ``zosam:directions=guided`` (the radius left out)."""
    radius = radius_param(name)
    rest = ",".join(f"{k}={v}" for k, v in kwargs.items() if k != radius)
    return f"{name}:{rest}" if rest else name


def run_config(setting: str, *, name: str, kwargs: dict[str, Any], rho: float | None, noise: float, seed: int,
               overrides: Sequence[str] = (), device: str = "cpu") -> dict[str, Any]:
    """The run-config mapping of one run (validated by ``RunConfig.from_dict``)."""
    from zosam.config import apply_overrides

    s = SETTINGS[setting]
    opt = {"name": name, **_COMMON_OPT, "lr": s["lr"], **kwargs}
    if rho is not None:
        opt[radius_param(name) or "rho"] = rho
    cfg = {"seed": seed, "epochs": s["epochs"], "device": device,
           "data": {**s["data"], "label_noise": noise, "label_noise_seed": seed},
           "model": copy.deepcopy(s["model"]), "optimizer": opt, "sparse": dict(s["sparse"]),
           "eval": {"every": s["epochs"]}, "tracking": {"enabled": False}}
    cfg = apply_overrides(cfg, list(overrides))
    cfg["eval"] = {"every": cfg["epochs"]}  # the final epoch only (after overrides of epochs)
    key = f"{setting}-n{noise:g}-{method_label(name, kwargs)}" + (f"-rho{rho:g}" if rho is not None else "")
    cfg["name"] = f"flat-{key}-s{seed}".replace(":", "_").replace("=", "").replace(",", "_")
    return cfg


def grid(plan: dict[str, dict[str, Any]], seeds: int, overrides: Sequence[str] = (),
         device: str = "cpu") -> list[dict[str, Any]]:
    """Every run as a job description, seed-major (an interrupted run leaves whole seeds).

    ``plan`` maps each setting to its ``noise``, ``methods`` and ``rho`` lists.
    """
    jobs = []
    for seed in range(seeds):
        for setting, p in plan.items():
            parsed = [parse_method(m) for m in p["methods"]]
            for n in p["noise"]:
                for name, kwargs in parsed:
                    radius = radius_param(name)
                    grid_rho = radius is not None and radius not in kwargs
                    for rho in (p["rho"] if grid_rho else [None]):
                        jobs.append({"setting": setting, "noise": float(n), "method": method_label(name, kwargs),
                                     "rho": rho if rho is not None else kwargs.get(radius), "seed": seed,
                                     "config": run_config(setting, name=name, kwargs=kwargs, rho=rho, noise=n,
                                                          seed=seed, overrides=overrides, device=device)})
    return jobs


# -- flatness measures (pure functions of a model, a loss and batches) --------------------------------
Batches = Sequence[tuple[Tensor, Tensor]]


def _batch_loss(model: nn.Module, loss_fn: Callable[..., Tensor], batches: Batches) -> Tensor:
    """The mean loss over all samples of ``batches`` (batches weighted by their size)."""
    n = sum(len(y) for _, y in batches)
    return sum(loss_fn(model(x), y) * (len(y) / n) for x, y in batches)  # type: ignore[return-value]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b, strict=True)))


def _norm(a: Sequence[Tensor]) -> float:
    return math.sqrt(_dot(a, a))


def _apply(vs: list[Tensor], masks: Sequence[Tensor | None]) -> list[Tensor]:
    return [v if m is None else v * m for v, m in zip(vs, masks, strict=True)]


def hessian_vector_product(model: nn.Module, loss_fn: Callable[..., Tensor], batches: Batches,
                           params: Sequence[Tensor], v: Sequence[Tensor]) -> list[Tensor]:
    """``H v`` of the mean loss over ``batches`` (double backward, one batch at a time)."""
    n = sum(len(y) for _, y in batches)
    out = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        loss = loss_fn(model(x), y) * (len(y) / n)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=list(v))
        for o, h in zip(out, hv, strict=True):
            o.add_(h.detach())
    return out


def _power_iteration(hvp: Callable[[list[Tensor]], list[Tensor]], v: list[Tensor], iters: int, tol: float,
                     shift: float = 0.0) -> float:
    """Dominant eigenvalue of ``H - shift I`` (``hvp`` gives ``H v``), by power iteration from ``v``."""
    nv = _norm(v)
    v = [t / nv for t in v]
    lam = 0.0
    for i in range(iters):
        hv = hvp(v)
        if shift:
            hv = [h - shift * t for h, t in zip(hv, v, strict=True)]
        new = _dot(v, hv)  # Rayleigh quotient (||v|| = 1)
        nh = _norm(hv)
        if nh == 0:
            return 0.0
        v = [t / nh for t in hv]
        if i > 0 and abs(new - lam) <= tol * max(abs(new), 1e-12):
            return new
        lam = new
    return lam


def top_hessian_eigenvalue(model: nn.Module, loss_fn: Callable[..., Tensor], batches: Batches, *,
                           params: Sequence[Tensor] | None = None, masks: Sequence[Tensor | None] | None = None,
                           iters: int = 20, tol: float = 1e-3, seed: int = 0) -> float:
    """The largest Hessian eigenvalue of the loss over ``batches``, by power iteration with HVPs.

    Power iteration finds the eigenvalue of largest magnitude; when that one is negative
    (a saddle region), a second run on ``H - lambda_neg I`` finds the largest one. Restricted
    to the active weights when ``masks`` are given (the Hessian of the loss as a function
    of the active weights: ``M H M``). Each run stops when the Rayleigh quotient changes by
    less than ``tol`` relative; start vectors come from a generator seeded with ``seed``.
    """
    params = list(params if params is not None else (p for p in model.parameters() if p.requires_grad))
    masks = list(masks) if masks is not None else [None] * len(params)
    gen = torch.Generator().manual_seed(seed)

    def start() -> list[Tensor]:
        return _apply([torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params], masks)

    def hvp(v: list[Tensor]) -> list[Tensor]:
        return _apply(hessian_vector_product(model, loss_fn, batches, params, v), masks)

    lam = _power_iteration(hvp, start(), iters, tol)
    if lam < 0:
        lam = _power_iteration(hvp, start(), iters, tol, shift=lam) + lam
    return lam


def sam_gap(model: nn.Module, loss_fn: Callable[..., Tensor], batches: Batches, rho: float, *,
            params: Sequence[Tensor] | None = None, masks: Sequence[Tensor | None] | None = None) -> float:
    """``L(w + rho g / ||g||) - L(w)`` on ``batches``, g the (masked) gradient at w; w restored exactly."""
    params = list(params if params is not None else (p for p in model.parameters() if p.requires_grad))
    masks = list(masks) if masks is not None else [None] * len(params)
    loss0 = _batch_loss(model, loss_fn, batches)
    g = _apply([t.detach() for t in torch.autograd.grad(loss0, params)], masks)
    ng = _norm(g)
    if ng == 0:
        return 0.0
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, t in zip(params, g, strict=True):
            p.add_(t, alpha=rho / ng)
        loss1 = float(_batch_loss(model, loss_fn, batches))
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    return loss1 - float(loss0.detach())


def gradient_variance(model: nn.Module, loss_fn: Callable[..., Tensor], batches: Batches, *,
                      params: Sequence[Tensor] | None = None,
                      masks: Sequence[Tensor | None] | None = None) -> float:
    """Trace of the covariance of the mini-batch gradients: ``sum_k ||g_k - mean g||^2 / (K - 1)``."""
    params = list(params if params is not None else (p for p in model.parameters() if p.requires_grad))
    masks = list(masks) if masks is not None else [None] * len(params)
    if len(batches) < 2:
        raise ValueError("gradient_variance needs at least 2 batches")
    grads = []
    for x, y in batches:
        g = torch.autograd.grad(loss_fn(model(x), y), params)
        grads.append(torch.cat([t.detach().flatten() for t in _apply(list(g), masks)]))
    stacked = torch.stack(grads)
    return float((stacked - stacked.mean(0)).pow(2).sum() / (len(grads) - 1))


# -- one run (in a worker process) -------------------------------------------------------------------
def _clean_train_labels(data_cfg: dict[str, Any]) -> Tensor:
    from zosam.data import DataConfig, load_dataset

    return load_dataset(DataConfig.from_dict({**data_cfg, "label_noise": 0.0})).train.labels


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one job (``grid``) and measure it; returns its record (module level: runs in workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(job.get("threads", 1))
    try:
        return _run_one(job)
    finally:
        torch.set_num_threads(threads)  # in-process runs (--jobs 1) leave the caller's setting


def _run_one(job: dict[str, Any]) -> dict[str, Any]:
    from zosam.config import RunConfig
    from zosam.engine import Diverged, Trainer

    m = job["measure"]
    cfg = RunConfig.from_dict(job["config"])
    t0 = time.perf_counter()
    trainer = Trainer(cfg, log=None)
    if not trainer.data.in_memory:
        raise ValueError(f"data.name={cfg.data.name!r}: the flatness benchmark needs an in-memory dataset")
    trainer.init_masks()
    model, loader, loss_fn = trainer.model, trainer.train_loader, trainer.loss_fn
    images, labels = trainer.data.train.images, trainer.data.train.labels
    dev, dtype = trainer.device, cfg.torch_dtype
    params = [p for p in model.parameters() if p.requires_grad]

    def masks() -> list[Tensor | None]:
        return [trainer.optimizer.masks.get(p) for p in params]

    def batches(idx: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
        return [(loader.normalise(images[c].to(dev)).to(dtype), labels[c].to(dev)) for c in idx.split(size)]

    gen = torch.Generator().manual_seed(10_007)  # the same samples for every method and seed
    order = torch.randperm(len(labels), generator=gen)
    fixed = batches(order[: m["hessian_samples"]], 256)
    bs = cfg.data.batch_size
    var_idx = torch.randperm(len(labels), generator=gen)[: bs * m["variance_batches"]]
    var_batches = batches(var_idx, bs)
    checkpoints = sorted({max(1, round(f * cfg.epochs)) for f in m["variance_at"]})
    variance: dict[str, float] = {}

    def in_eval(fn):
        was = model.training
        model.eval()  # deterministic measures: no dropout, BatchNorm with its running statistics
        try:
            return fn()
        finally:
            model.train(was)

    def on_epoch(res, path) -> None:
        if res.epoch + 1 in checkpoints:
            variance[str(res.epoch + 1)] = in_eval(lambda: gradient_variance(model, loss_fn, var_batches,
                                                                             params=params, masks=masks()))

    trainer.on_epoch = on_epoch
    record: dict[str, Any] = {k: job[k] for k in ("setting", "noise", "method", "rho", "seed", "config")}
    try:
        summary = trainer.fit()
    except Diverged as e:
        return {**record, "status": "failed", "reason": str(e), "elapsed_s": time.perf_counter() - t0}
    with torch.no_grad():
        was = model.training
        model.eval()
        preds = torch.cat([model(x).argmax(1).cpu() for x, _ in batches(torch.arange(len(labels)), 1000)])
        model.train(was)
    clean = _clean_train_labels(job["config"]["data"])
    flipped = clean != labels
    top = in_eval(lambda: top_hessian_eigenvalue(model, loss_fn, fixed, params=params, masks=masks(),
                                                 iters=m["hessian_iters"], seed=job["seed"]))
    gap = in_eval(lambda: sam_gap(model, loss_fn, fixed, m["gap_rho"], params=params, masks=masks()))
    steps = summary["steps"]
    record.update({
        "status": "finished", "test_acc": summary["final_test_acc"],
        "train_acc_noisy": float((preds == labels).float().mean()),
        "train_acc_clean": float((preds == clean).float().mean()),
        "memorised": float((preds[flipped] == labels[flipped]).float().mean()) if flipped.any() else None,
        "flipped": int(flipped.sum()), "top_eig": top, "sam_gap": gap, "grad_var": variance,
        "steps": steps, "fwd_per_step": summary["passes_forward"] / steps,
        "nograd_per_step": summary["passes_forward_no_grad"] / steps,
        "bwd_per_step": summary["passes_backward"] / steps,
        "s_per_step": summary["train_time_s"] / steps, "train_time_s": summary["train_time_s"],
        "realised_density": summary["realised_density"], "elapsed_s": time.perf_counter() - t0,
    })
    return record


# -- aggregation (pure) -------------------------------------------------------------------------------
def interval95(values: Sequence[float]) -> float | None:
    """Half-width of the two-sided 95 % Student-t interval of the mean (``None`` for one value)."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    return float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def _fmean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def cell_key(r: dict[str, Any]) -> tuple[str, float, str, float | None]:
    return r["setting"], float(r["noise"]), r["method"], r["rho"]


def aggregate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, noise, method, rho): accuracy over seeds, flatness, variance, cost.

    Accuracies in percent. ``gain``: this row's mean minus SGD's at the same setting and
    noise. ``grad_var`` is at the last checkpoint; ``grad_var_vs_sgd`` its ratio to SGD's.
    ``s_step_vs_sgd``: seconds per step over SGD's.
    """
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        cells.setdefault(cell_key(r), []).append(r)
    rows = []
    for (setting, noise, method, rho), runs in cells.items():
        ok = [r for r in runs if r["status"] == "finished"]
        row: dict[str, Any] = {"setting": setting, "noise": noise, "method": method,
                               "rho": "" if rho is None else rho, "seeds": len(ok), "failed": len(runs) - len(ok)}
        if ok:
            accs = [100 * r["test_acc"] for r in ok]
            mean, std = mean_std(accs)
            ci = interval95(accs)
            last = [r["grad_var"][max(r["grad_var"], key=int)] if r["grad_var"] else None for r in ok]
            row.update(acc_mean=mean, acc_std="" if std is None else std, acc_ci95="" if ci is None else ci,
                       train_fit=100 * statistics.fmean(r["train_acc_noisy"] for r in ok),
                       memorised=_pct(_fmean([r["memorised"] for r in ok])),
                       top_eig=_fmean([r["top_eig"] for r in ok]), sam_gap=_fmean([r["sam_gap"] for r in ok]),
                       grad_var=_fmean(last),
                       fwd_step=statistics.fmean(r["fwd_per_step"] for r in ok),
                       nograd_step=statistics.fmean(r["nograd_per_step"] for r in ok),
                       bwd_step=statistics.fmean(r["bwd_per_step"] for r in ok),
                       s_step=statistics.fmean(r["s_per_step"] for r in ok))
        rows.append(row)
    sgd = {(r["setting"], r["noise"]): r for r in rows if r["method"] == BASELINE and "acc_mean" in r}
    for r in rows:
        ref = sgd.get((r["setting"], r["noise"]))
        have = ref is not None and "acc_mean" in r
        r["gain"] = r["acc_mean"] - ref["acc_mean"] if have else ""
        r["grad_var_vs_sgd"] = (r["grad_var"] / ref["grad_var"]) if have and r["grad_var"] and ref["grad_var"] \
            else ""
        r["s_step_vs_sgd"] = r["s_step"] / ref["s_step"] if have and ref["s_step"] else ""
    return rows


def _pct(x: float | None) -> float | str:
    return "" if x is None else 100 * x


def best_rows(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, float, str], dict[str, Any]]:
    """Each (setting, noise, method) at its best rho (highest mean test accuracy)."""
    out: dict[tuple[str, float, str], dict[str, Any]] = {}
    for r in rows:
        if "acc_mean" not in r:
            continue
        k = (r["setting"], r["noise"], r["method"])
        if k not in out or r["acc_mean"] > out[k]["acc_mean"]:
            out[k] = r
    return out


def decide(rows: Sequence[dict[str, Any]], *, judge: str = GUIDED,
           targets: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Per (setting, noise): SAM's gain over SGD, whether it is decisive, each method's fraction.

    Decisive: SAM's gain (SAM at its best rho) >= 3 x the larger of SGD's and SAM's seed
    standard deviations, and > 0, with at least 2 seeds each. ``frac.<method>``: (method's best-rho mean - SGD's mean) /
    SAM's gain. ``judge_pass``: on a decisive setting, the judged method's fraction reaches
    the setting's target with one backward pass per step (empty when not decisive or
    when the judged method did not run).
    """
    targets = targets if targets is not None else {k: v["target"] for k, v in SETTINGS.items()}
    best = best_rows(rows)
    keys = list(dict.fromkeys((s, n) for s, n, _ in best))
    methods = list(dict.fromkeys(m for _, _, m in best if m not in (BASELINE, REFERENCE)))
    out = []
    for setting, noise in keys:
        sgd, sam = best.get((setting, noise, BASELINE)), best.get((setting, noise, REFERENCE))
        if sgd is None or sam is None:
            continue
        gain = sam["acc_mean"] - sgd["acc_mean"]
        spread = max(_std(sgd), _std(sam))
        decisive = gain > 0 and gain >= 3 * spread and min(sgd["seeds"], sam["seeds"]) >= 2
        row: dict[str, Any] = {"setting": setting, "noise": noise, "sgd": sgd["acc_mean"], "sgd_std": _std(sgd),
                               "sam": sam["acc_mean"], "sam_std": _std(sam), "sam_rho": sam["rho"],
                               "sam_gain": gain, "three_std": 3 * spread, "decisive": decisive}
        for m in methods:
            b = best.get((setting, noise, m))
            row[f"frac.{m}"] = (b["acc_mean"] - sgd["acc_mean"]) / gain if b is not None and gain != 0 else ""
        j = best.get((setting, noise, judge))
        target = targets.get(setting, 0.8)
        row["target"] = target
        if decisive and j is not None and gain != 0:
            row["judge_pass"] = (j["acc_mean"] - sgd["acc_mean"]) / gain >= target and round(j["bwd_step"], 6) == 1
        else:
            row["judge_pass"] = ""
        out.append(row)
    return out


def _std(row: dict[str, Any]) -> float:
    return row["acc_std"] if isinstance(row.get("acc_std"), float) else 0.0


# -- outputs --------------------------------------------------------------------------------------------
TABLE_COLUMNS = ["setting", "noise", "method", "rho", "seeds", "acc_mean", "acc_std", "acc_ci95", "gain",
                 "train_fit", "memorised", "top_eig", "sam_gap", "grad_var", "grad_var_vs_sgd", "fwd_step",
                 "nograd_step", "bwd_step", "s_step", "s_step_vs_sgd", "failed"]


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def decision_text(decision: Sequence[dict[str, Any]], judge: str) -> str:
    """The decision as plain lines: SAM's gain, decisive or not, every method's fraction."""
    lines = []
    for d in decision:
        fr = "  ".join(f"{k[5:]} {v:.2f}" for k, v in d.items() if k.startswith("frac.") and v != "")
        verdict = "decisive" if d["decisive"] else "NOT decisive (SAM's gain < 3 seed std)"
        lines.append(f"{d['setting']:14s} noise {d['noise']:.1f}: SGD {d['sgd']:.1f}+-{d['sgd_std']:.1f}  "
                     f"SAM(rho {d['sam_rho']}) {d['sam']:.1f}+-{d['sam_std']:.1f}  gain {d['sam_gain']:+.1f} "
                     f"(3 std {d['three_std']:.1f}) {verdict}")
        lines.append(f"{'':14s}   fraction of SAM's gain closed: {fr}")
        if d["judge_pass"] != "":
            lines.append(f"{'':14s}   {judge}: {'MEETS' if d['judge_pass'] else 'MISSES'} the target "
                         f"{d['target']:.0%}")
    decisive = [d for d in decision if d["decisive"] and d["judge_pass"] != ""]
    passed = sum(bool(d["judge_pass"]) for d in decisive)
    lines.append(f"{judge}: meets its target on {passed} of {len(decisive)} decisive (setting, noise) cells "
                 f"({sum(d['decisive'] for d in decision)} decisive of {len(decision)})")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scatter_panels(points: Sequence[dict[str, Any]], x: Callable[[dict[str, Any]], float],
                    y: Callable[[dict[str, Any]], float], path: Path, *, xlabel: str, ylabel: str, title: str,
                    logx: bool = False, zero_line: bool = False) -> Path:
    """One panel per setting; colour = method, marker = noise level."""
    plt = _plt()
    from matplotlib.lines import Line2D

    settings = list(dict.fromkeys(p["setting"] for p in points)) or ["-"]
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.6), squeeze=False)
    markers = "osD^v<>px*h"
    colours = plt.get_cmap("tab10")
    for ax, s in zip(axes[0], settings, strict=True):
        pts = [p for p in points if p["setting"] == s]
        methods = list(dict.fromkeys(p["method"] for p in pts))
        noises = sorted({p["noise"] for p in pts})
        for p in pts:
            ax.scatter([x(p)], [y(p)], color=colours(methods.index(p["method"]) % 10),
                       marker=markers[noises.index(p["noise"]) % len(markers)], edgecolors="k", linewidths=0.4,
                       alpha=0.85)
        handles = [Line2D([], [], ls="", marker="o", color=colours(i % 10), label=m) for i, m in enumerate(methods)]
        handles += [Line2D([], [], ls="", marker=markers[i % len(markers)], color="grey", label=f"noise {n:g}")
                    for i, n in enumerate(noises)]
        if logx:
            ax.set_xscale("log")
        if zero_line:
            ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{s}: {title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pass_cost(row: dict[str, Any]) -> float:
    """Passes per step in forward-pass equivalents (a backward pass counted as two forwards),
    over SGD's 3: a cost that the machine's load does not change (seconds are in the table)."""
    return (row["fwd_step"] + row["nograd_step"] + 2 * row["bwd_step"]) / 3


def plot_gain_vs_cost(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Accuracy gain over SGD against the passes per step relative to SGD (each method at its best rho)."""
    best = [r for r in best_rows(rows).values() if r["gain"] != ""]
    return _scatter_panels(best, pass_cost, lambda r: r["gain"], path,
                           xlabel="cost per step / SGD's (passes; a backward = 2 forwards)",
                           ylabel="test accuracy gain over SGD (points)",
                           title="each method at its best rho, mean over seeds", zero_line=True)


def plot_acc_vs_eigenvalue(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Every run's test accuracy against its top Hessian eigenvalue (log scale)."""
    ok = [r for r in records if r["status"] == "finished" and r.get("top_eig") is not None]
    return _scatter_panels(ok, lambda r: max(r["top_eig"], 1e-6), lambda r: 100 * r["test_acc"], path,
                           xlabel="top Hessian eigenvalue of the training loss (final weights)",
                           ylabel="test accuracy %", title="every run", logx=True)


# -- main -----------------------------------------------------------------------------------------------
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
    return _report(ordered, g, args, out, time.perf_counter() - t0, measure)


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


def _report(records: list[dict[str, Any]], g: dict[str, Any], args: argparse.Namespace, out: Path,
            wall: float, measure: dict[str, Any]) -> dict[str, Any]:
    from zosam.compare import write_csv

    rows = aggregate(records)
    decision = decide(rows, judge=args.judge)
    write_csv(out / "flatness_table.csv", rows)
    (out / "flatness_table.md").write_text(markdown(rows, TABLE_COLUMNS))
    dcols = list(dict.fromkeys(k for d in decision for k in d))
    if decision:
        write_csv(out / "flatness_decision.csv", decision)
    text = decision_text(decision, args.judge)
    (out / "flatness_decision.md").write_text(markdown(decision, dcols) + "\n```\n" + text + "\n```\n")
    plots = [plot_gain_vs_cost(rows, out / "flatness_gain_vs_cost.png"),
             plot_acc_vs_eigenvalue(records, out / "flatness_acc_vs_eigenvalue.png")]
    (out / RESULTS_FILE).write_text(json.dumps({"benchmark": "flatness", "grid": g, "measure": measure,
                                                "records": records, "rows": rows, "decision": decision},
                                               indent=1, default=str))
    summary = {"settings": " ".join(g["plan"]), "plan": json.dumps(g["plan"]), "seeds": g["seeds"],
               "setting_labels": "; ".join(f"{k}: {SETTINGS[k]['label']}" for k in g["plan"]),
               "overrides": " ".join(g["overrides"]), "jobs": args.jobs, "threads": args.threads,
               "planned_runs": g["planned_runs"], "runs": len(records),
               "failed": sum(r["status"] != "finished" for r in records),
               "wall_time_s": wall, "judge": args.judge, "results": str(out / RESULTS_FILE),
               **{f"m.{k}": str(v) for k, v in measure.items()},
               "decisive_cells": sum(bool(d["decisive"]) for d in decision),
               "judge_passes": sum(d["judge_pass"] is True for d in decision)}
    table_rows = [{**r, "method": f"{r['setting']}.n{r['noise']:g}.{r['method']}"
                   + (f".rho{r['rho']:g}" if r["rho"] != "" else "")} for r in rows]
    record = emit("flatness", table_rows, summary, mlflow_uri=args.tracking_uri,
                  columns=[c for c in TABLE_COLUMNS if c not in ("setting", "noise")],
                  artifacts=[out / "flatness_table.md", out / "flatness_table.csv", out / "flatness_decision.md",
                             *plots])
    print("\ndecision (each method at its best rho; fractions of SAM's gain over SGD):")
    print(text)
    print(f"tables: {out / 'flatness_table.md'}, {out / 'flatness_decision.md'}; plots: "
          f"{', '.join(str(p) for p in plots)}")
    return {**record, "decision": decision}


if __name__ == "__main__":
    main()
