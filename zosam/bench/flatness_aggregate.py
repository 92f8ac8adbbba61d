"""Flatness records over seeds: one row per (setting, noise, method, rho), and the decision
(SAM's gain over SGD, decisive or not, every method's fraction of it)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from zosam.bench.flatness_grid import BASELINE, GUIDED, REFERENCE, SETTINGS
from zosam.stats import mean_or_none, seed_stats


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
            acc = seed_stats(accs)
            last = [r["grad_var"][max(r["grad_var"], key=int)] if r["grad_var"] else None for r in ok]
            row.update(acc_mean=acc.mean, acc_std="" if acc.std is None else acc.std,
                       acc_ci95="" if acc.ci95 is None else acc.ci95,
                       train_fit=100 * statistics.fmean(r["train_acc_noisy"] for r in ok),
                       memorised=_pct(mean_or_none([r["memorised"] for r in ok])),
                       top_eig=mean_or_none([r["top_eig"] for r in ok]),
                       sam_gap=mean_or_none([r["sam_gap"] for r in ok]),
                       grad_var=mean_or_none(last),
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
