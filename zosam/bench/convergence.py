"""Convergence: epochs (and training time) to reach a fixed test accuracy, per cell.

Reads the accuracy benchmark's results JSON (test accuracy after every epoch, epoch
times). The threshold is ``--threshold`` (a fraction, e.g. 0.5) or, by default,
``--threshold-fraction`` (0.8) x the best cell's mean final accuracy: a level that the
reduced runs do reach, so the epochs to get there say something (the paper's 90 % on
CIFAR-10 is out of reach of a few CPU epochs on a subset).

Per run: the first epoch whose test accuracy is >= the threshold, and the training
time up to the end of that epoch (sum of its epoch times; evaluation excluded). Per cell
(host, optimizer, density): how many seeds reached it, the mean epochs and time over the
seeds that did (labelled ``reached k/n``; "not reached" when none did), and the epoch at
which the seed-mean curve crosses the threshold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zosam.bench import emit
from zosam.bench.accuracy import RESULTS_FILE, read_results
from zosam.bench.accuracy_aggregate import group

NOT_REACHED = "not reached"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zosam bench convergence", description=__doc__.splitlines()[0])
    p.add_argument("--results", default=f"bench_results/accuracy/{RESULTS_FILE}",
                   help="the accuracy benchmark's results JSON")
    p.add_argument("--threshold", type=float, default=None, help="test accuracy to reach, a fraction in (0, 1]")
    p.add_argument("--threshold-fraction", type=float, default=0.8,
                   help="without --threshold: this fraction of the best cell's mean final accuracy")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: the accuracy benchmark's)")
    return p


def first_crossing(curve: Sequence[float | None], threshold: float) -> int | None:
    """1-based index of the first value >= ``threshold`` (``None`` entries skipped), else ``None``."""
    for i, v in enumerate(curve):
        if v is not None and v >= threshold:
            return i + 1
    return None


def time_to(epoch_times: Sequence[float], epoch: int) -> float:
    """Training time up to the end of ``epoch`` (1-based)."""
    return float(sum(epoch_times[:epoch]))


def default_threshold(records: Sequence[dict[str, Any]], fraction: float) -> float:
    """``fraction`` x the best cell mean of the final test accuracy (finished runs)."""
    means = [statistics.fmean(r["summary"]["final_test_acc"] for r in runs)
             for runs in group(r for r in records if r["status"] == "finished").values()]
    if not means:
        raise ValueError("no finished runs: cannot derive a threshold; pass --threshold")
    return fraction * max(means)


def aggregate(records: Sequence[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """One row per cell; see the module docstring."""
    rows = []
    for (host, opt, density), runs in group(r for r in records if r["status"] == "finished").items():
        curves = [[h["test_acc"] for h in r["history"]] for r in runs]
        hits = [(first_crossing(c, threshold), r) for c, r in zip(curves, runs, strict=True)]
        reached = [(e, r) for e, r in hits if e is not None]
        n_epochs = min(len(c) for c in curves)
        # The seed-mean curve over the epochs every seed has (None where any seed was not evaluated).
        mean_curve = [None if any(c[i] is None for c in curves) else statistics.fmean(c[i] for c in curves)
                      for i in range(n_epochs)]
        mean_cross = first_crossing(mean_curve, threshold)
        row: dict[str, Any] = {"method": f"{host}+{opt}@{density:g}", "host": host, "optimizer": opt,
                               "sparsity_%": round(100 * (1 - density), 4),
                               "reached": f"{len(reached)}/{len(runs)}", "epochs": NOT_REACHED,
                               "time_s": NOT_REACHED,
                               "epochs_mean_curve": mean_cross if mean_cross is not None else NOT_REACHED,
                               "final_acc": 100 * statistics.fmean(r["summary"]["final_test_acc"] for r in runs)}
        if reached:
            row["epochs"] = statistics.fmean(e for e, _ in reached)
            row["time_s"] = statistics.fmean(time_to([h["epoch_time_s"] for h in r["history"]], e)
                                             for e, r in reached)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from zosam.validate import in_range

    path = Path(args.results)
    results = read_results(path)
    records = results["records"]
    if args.threshold is not None:
        threshold = in_range("--threshold", args.threshold, 0, 1, low_open=True)
        how = "given"
    else:
        in_range("--threshold-fraction", args.threshold_fraction, 0, 1, low_open=True)
        threshold = default_threshold(records, args.threshold_fraction)
        how = f"{args.threshold_fraction:g} x best cell mean final accuracy"
    rows = aggregate(records, threshold)
    summary = {"threshold": threshold, "threshold_rule": how, "source_results": str(path.resolve()),
               "epochs_per_run": results.get("settings", {}).get("epochs")}
    print(f"threshold: test accuracy >= {100 * threshold:.2f} % ({how})")
    columns = ["host", "optimizer", "sparsity_%", "reached", "epochs", "time_s", "epochs_mean_curve", "final_acc"]
    return emit("convergence", rows, summary, mlflow_uri=args.tracking_uri or results.get("tracking_uri"),
                columns=columns)


if __name__ == "__main__":
    main()
