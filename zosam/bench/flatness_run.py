"""One flatness run: train a grid job through the engine, then measure it (runs in a worker process)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from zosam.bench.flatness_measures import gradient_variance, sam_gap, top_hessian_eigenvalue


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
