"""Robustness: the accuracy benchmark's models on a CIFAR-10-C-style set generated here.

The set is generated once from a fixed class-balanced subset of the test split (default
200 images, all 15 benchmark corruptions, severities 1-5) with
``zosam.data.generate_cifar10c`` and cached in ``--out/cifar10c-<n>-seed<s>``; it is
labelled "CIFAR-10-C-style (generated)", never CIFAR-10-C (the constants are CIFAR-10-C's
where re-implemented, but the random draws and a few kernels differ; see
``zosam.data.corruptions``). Every finished run's final checkpoint is evaluated on the
clean images of that subset and on every corruption x severity block.

Reported per cell (host, optimizer, density), mean over seeds (std with ddof = 1): clean
accuracy on the subset, mean corrupted accuracy (over corruptions and severities), the
gap clean - corrupted, and mean accuracy per severity. Accuracies in percent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from zosam.bench import emit
from zosam.bench.accuracy import RESULTS_FILE, read_results
from zosam.bench.accuracy_aggregate import group
from zosam.console import eprint, progress_bar
from zosam.stats import mean_std


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zosam bench robustness", description=__doc__.splitlines()[0])
    p.add_argument("--results", default=f"bench_results/accuracy/{RESULTS_FILE}",
                   help="the accuracy benchmark's results JSON")
    p.add_argument("--out", default=None, help="where the generated set and results go (default: beside --results)")
    p.add_argument("--images", type=int, default=200, help="test images per corruption x severity")
    p.add_argument("--corruptions", nargs="+", default=None, help="default: the 15 benchmark corruptions")
    p.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--seed", type=int, default=0, help="seed of the image subset and of the corruptions")
    p.add_argument("--processes", type=int, default=1, help="processes generating the set")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: the accuracy benchmark's)")
    return p


def corruption_set(data_cfg: dict[str, Any], out: Path, *, images: int, corruptions: Sequence[str],
                   severities: Sequence[int], seed: int, processes: int = 1) -> tuple[Path, Any]:
    """Generate (or reuse) the set; returns its folder and the clean ``TensorSplit`` used.

    The subset is drawn from the whole test split of the run's dataset (not the run's
    ``test_subset``), class-balanced, by ``seed``; a cached set is reused only when its
    metadata records the same images count, seed, corruptions and severities.
    """
    from zosam.data import DataConfig, TensorSplit, balanced_subset, generate_cifar10c, load_dataset

    dc = {k: v for k, v in data_cfg.items() if k not in ("train_subset", "test_subset")}
    bundle = load_dataset(DataConfig.from_dict({**dc, "train_subset": 10}))
    idx = balanced_subset(bundle.test.labels, images, seed + 7919, bundle.num_classes)  # not the runs' draw
    clean = TensorSplit(bundle.test.images[idx], bundle.test.labels[idx])
    folder = out / f"{bundle.name}-c-{len(idx)}-seed{seed}"
    meta_file = folder / "metadata.json"
    want = {"num_images": len(idx), "seed": seed, "corruptions": list(corruptions), "severities": list(severities)}
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return folder, (clean, bundle)
    print(f"generating {len(corruptions)} corruptions x {len(severities)} severities x {len(idx)} images "
          f"in {folder} ...", flush=True)
    generate_cifar10c(clean.images, clean.labels, folder, corruptions, severities, seed, processes=processes,
                      source=f"{bundle.label} test split, class-balanced subset of {len(idx)} (seed {seed})")
    return folder, (clean, bundle)


def load_model(checkpoint: str | Path, num_classes: int, device: torch.device) -> torch.nn.Module:
    """The trained (masked) model of an accuracy-benchmark checkpoint, in eval mode."""
    from zosam.config import RunConfig
    from zosam.models import create_model

    ckpt = torch.load(checkpoint, map_location=device, weights_only=True)
    cfg = RunConfig.from_dict(ckpt["config"])
    model = create_model(cfg.model.name, num_classes=num_classes, **cfg.model.kwargs).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval()


@torch.no_grad()
def loader_accuracy(model: torch.nn.Module, loader) -> float:
    """Top-1 accuracy (fraction) of ``model`` over a loader of normalised batches."""
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def evaluate_run(model: torch.nn.Module, clean, cset, *, mean, std, batch_size: int,
                 device: torch.device) -> dict[str, float]:
    """Clean accuracy on the subset and accuracy per ``corruption.severity`` (fractions)."""
    from zosam.data import BatchLoader, corruption_accuracy

    def acc(loader) -> float:
        return loader_accuracy(model, loader)

    clean_loader = BatchLoader(clean.images, clean.labels, batch_size, train=False, augment=False, mean=mean,
                               std=std, device=device)
    return {"clean": acc(clean_loader),
            **corruption_accuracy(cset, acc, batch_size=batch_size, mean=mean, std=std, device=device)}


def corrupted_mean(per_block: dict[str, float]) -> float:
    """Mean accuracy over every corruption x severity block (the ``clean`` entry excluded)."""
    return statistics.fmean(v for k, v in per_block.items() if k != "clean")


def severity_mean(per_block: dict[str, float], severity: int) -> float:
    return statistics.fmean(v for k, v in per_block.items() if k != "clean" and k.endswith(f".{severity}"))


def aggregate(evaluated: Sequence[dict[str, Any]], severities: Sequence[int]) -> list[dict[str, Any]]:
    """Rows per cell: mean (and std over seeds) of clean, corrupted, gap; per-severity means.

    Each run's gap is its own clean minus its own corrupted accuracy; the row reports the
    mean of those gaps (equal to the difference of the means).
    """
    rows = []
    for (host, opt, density), runs in group(evaluated).items():
        clean = [100 * r["blocks"]["clean"] for r in runs]
        corr = [100 * corrupted_mean(r["blocks"]) for r in runs]
        gap = [a - b for a, b in zip(clean, corr, strict=True)]
        (cm, cs), (km, ks), (gm, gs) = mean_std(clean), mean_std(corr), mean_std(gap)
        row = {"method": f"{host}+{opt}@{density:g}", "host": host, "optimizer": opt,
               "sparsity_%": round(100 * (1 - density), 4), "seeds": len(runs), "clean": cm,
               "clean_std": "" if cs is None else cs, "corrupted": km, "corrupted_std": "" if ks is None else ks,
               "gap": gm, "gap_std": "" if gs is None else gs}
        for s in severities:
            row[f"sev{s}"] = statistics.fmean(100 * severity_mean(r["blocks"], s) for r in runs)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from zosam.data import BENCHMARK_CORRUPTIONS, CorruptionSet
    from zosam.validate import in_range

    in_range("--images", args.images, 1, integer=True)
    results_path = Path(args.results)
    results = read_results(results_path)
    runs = [r for r in results["records"] if r["status"] == "finished" and r.get("checkpoint")]
    if not runs:
        raise ValueError(f"--results {str(results_path)!r} has no finished runs with checkpoints")
    out = Path(args.out or results_path.parent).resolve()
    corruptions = list(args.corruptions or BENCHMARK_CORRUPTIONS)
    folder, (clean, bundle) = corruption_set(runs[0]["config"]["data"], out, images=args.images,
                                             corruptions=corruptions, severities=args.severities, seed=args.seed,
                                             processes=args.processes)
    cset = CorruptionSet.open(folder)
    device = torch.device(args.device)
    evaluated = []
    for r in progress_bar(runs, desc="robustness", unit="run"):
        model = load_model(r["checkpoint"], bundle.num_classes, device)
        blocks = evaluate_run(model, clean, cset, mean=bundle.mean, std=bundle.std, batch_size=args.batch_size,
                              device=device)
        evaluated.append({**{k: r[k] for k in ("name", "host", "optimizer", "density", "seed", "checkpoint")},
                          "final_test_acc": r["summary"].get("final_test_acc"), "blocks": blocks})
        eprint(f"{r['name']}: clean {blocks['clean']:.4f}  corrupted {corrupted_mean(blocks):.4f}")
    rows = aggregate(evaluated, cset.severities)
    (out / "robustness_results.json").write_text(json.dumps({"set": str(folder), "label": cset.label,
                                                             "runs": evaluated, "rows": rows}, indent=1))
    summary = {"set_label": cset.label, "set": str(folder), "images": len(clean), "corruptions": len(corruptions),
               "severities": list(cset.severities), "source_results": str(results_path.resolve()),
               "runs": len(evaluated)}
    print(f"evaluated on {cset.label}: {len(corruptions)} corruptions x severities {cset.severities} "
          f"x {len(clean)} images")
    columns = ["host", "optimizer", "sparsity_%", "seeds", "clean", "clean_std", "corrupted", "corrupted_std",
               "gap", "gap_std", *[f"sev{s}" for s in cset.severities]]
    return emit("robustness", rows, summary, mlflow_uri=args.tracking_uri or results.get("tracking_uri"),
                columns=columns)


if __name__ == "__main__":
    main()
