"""Is the CPU training step waiting on data? Loader time per batch vs one SGD step.

Times, on the same batches: loading the dataset (from the decoded cache, and optionally
the one-off decode of the JPEG archive), one augmented training batch from
``BatchLoader`` (permutation, crop + flip, normalisation), one evaluation batch, and one
SGD step of the model (forward, backward, update) on that batch. The summary states the
loader's share of a training step: ``load / (load + step)``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from zosam.bench import emit
from zosam.cliargs import add_tracking_uri
from zosam.data import DataConfig, load_dataset, make_loaders
from zosam.models import create_model


def _time_batches(loader, n: int) -> list[float]:
    """Seconds per batch for ``n`` batches (epochs chained if the loader is shorter)."""
    times: list[float] = []
    epoch = 0
    while len(times) < n:
        loader.set_epoch(epoch)
        it = iter(loader)
        while len(times) < n:
            t = time.perf_counter()
            try:
                next(it)
            except StopIteration:
                break
            times.append(time.perf_counter() - t)
        epoch += 1
    return times


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="zosam bench data-speed", description=__doc__)
    p.add_argument("--dataset", default="cifar10-jpeg")
    p.add_argument("--archive", default=None, help="JPEG archive (default: data default)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=50, help="loader batches to time")
    p.add_argument("--steps", type=int, default=10, help="SGD steps to time (after 2 warm-up)")
    p.add_argument("--model", default="resnet32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--decode", action="store_true",
                   help="also time the one-off decode of the archive (into a temporary cache)")
    add_tracking_uri(p, "--mlflow-uri", dest="mlflow_uri", help="also log to this MLflow tracking URI")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = {"archive": args.archive} if args.archive else {}
    cfg = DataConfig.from_dict({"name": args.dataset, "batch_size": args.batch_size,
                                "eval_batch_size": args.batch_size, **overrides})
    rows = []
    if args.decode and args.dataset == "cifar10-jpeg":
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            load_dataset(DataConfig.from_dict({**cfg.to_dict(), "cache_dir": tmp}))
            rows.append({"what": "decode archive (once)", "seconds": time.perf_counter() - t})
    load_dataset(cfg)  # make sure the cache exists before timing a cached load
    t = time.perf_counter()
    bundle = load_dataset(cfg)
    rows.append({"what": "load dataset (cached)", "seconds": time.perf_counter() - t})

    train, test = make_loaders(bundle, cfg, seed=0)
    t_train = statistics.median(_time_batches(train, args.batches))
    t_eval = statistics.median(_time_batches(test, min(args.batches, len(test))))

    model = create_model(args.model, num_classes=bundle.num_classes)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    train.set_epoch(0)
    x, y = next(iter(train))
    step_times = []
    for i in range(args.steps + 2):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 2:  # warm-up steps excluded
            step_times.append(time.perf_counter() - t)
    t_step = statistics.median(step_times)
    bs = args.batch_size
    rows += [
        {"what": f"train batch {bs} (augment)", "seconds": t_train, "images_per_s": bs / t_train},
        {"what": f"eval batch {bs}", "seconds": t_eval, "images_per_s": bs / t_eval},
        {"what": f"{args.model} SGD step, batch {bs}", "seconds": t_step,
         "images_per_s": bs / t_step},
    ]
    summary = {
        "dataset": bundle.label,
        "batch_size": bs,
        "model": args.model,
        "load_s_per_batch": t_train,
        "step_s": t_step,
        "load_fraction_of_step": t_train / (t_train + t_step),
    }
    return emit("data_speed", rows, summary, mlflow_uri=args.mlflow_uri,
                columns=["what", "seconds", "images_per_s"])


if __name__ == "__main__":
    main()
