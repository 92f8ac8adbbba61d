"""Accuracy records over seeds (pure): one row per cell (host, optimizer, density), with
the change against the host alone (SGD)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from zosam.stats import mean_std


def cell_key(r: dict[str, Any]) -> tuple[str, str, float]:
    return r["host"], r["optimizer"], float(r["density"])


def group(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
    """Records grouped by (host, optimizer, density), in first-seen order."""
    out: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(cell_key(r), []).append(r)
    return out


def aggregate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per cell: final accuracy over seeds, cost, and the gain over SGD.

    ``vs_sgd`` is this cell's mean minus the mean of the host alone (optimizer ``sgd``)
    at the same host and density, in accuracy points (fraction x 100).
    """
    rows = []
    cells = group(records)
    for (host, opt, density), runs in cells.items():
        ok = [r for r in runs if r["status"] == "finished" and r["summary"].get("final_test_acc") is not None]
        row: dict[str, Any] = {"method": f"{host}+{opt}@{density:g}", "host": host, "optimizer": opt,
                               "sparsity_%": round(100 * (1 - density), 4), "seeds": len(ok),
                               "failed": len(runs) - len(ok)}
        if ok:
            accs = [100 * r["summary"]["final_test_acc"] for r in ok]
            mean, std = mean_std(accs)
            row.update(acc_mean=mean, acc_std=std if std is not None else "", acc_min=min(accs), acc_max=max(accs),
                       train_time_s=sum(r["summary"]["train_time_s"] for r in ok),
                       bwd_per_run=statistics.fmean(r["summary"]["passes_backward"] for r in ok),
                       fwd_per_run=statistics.fmean(r["summary"]["passes_forward"]
                                                    + r["summary"]["passes_forward_no_grad"] for r in ok))
        rows.append(row)
    means = {(r["host"], r["optimizer"], r["sparsity_%"]): r.get("acc_mean") for r in rows}
    for r in rows:
        ref = means.get((r["host"], "sgd", r["sparsity_%"]))
        r["vs_sgd"] = r["acc_mean"] - ref if ref is not None and r.get("acc_mean") is not None else ""
    return rows


COLUMNS = ["host", "optimizer", "sparsity_%", "seeds", "acc_mean", "acc_std", "acc_min", "acc_max", "vs_sgd",
           "train_time_s", "bwd_per_run", "fwd_per_run", "failed"]
