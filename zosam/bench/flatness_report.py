"""The flatness report: tables (Markdown, CSV), the decision in words, the plots, and the
benchmark record (printed, and logged to MLflow when asked)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zosam.bench import emit
from zosam.bench.flatness_aggregate import aggregate, best_rows, decide
from zosam.bench.flatness_grid import SETTINGS
from zosam.plotting import pyplot, save
from zosam.tables import dict_rows, markdown_table, write_csv

RESULTS_FILE = "flatness_results.json"
TABLE_COLUMNS = ["setting", "noise", "method", "rho", "seeds", "acc_mean", "acc_std", "acc_ci95", "gain",
                 "train_fit", "memorised", "top_eig", "sam_gap", "grad_var", "grad_var_vs_sgd", "fwd_step",
                 "nograd_step", "bwd_step", "s_step", "s_step_vs_sgd", "failed"]


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


def _scatter_panels(points: Sequence[dict[str, Any]], x: Callable[[dict[str, Any]], float],
                    y: Callable[[dict[str, Any]], float], path: Path, *, xlabel: str, ylabel: str, title: str,
                    logx: bool = False, zero_line: bool = False) -> Path:
    """One panel per setting; colour = method, marker = noise level."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    settings = list(dict.fromkeys(p["setting"] for p in points)) or ["-"]
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 5.2), squeeze=False,
                             layout="constrained")
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
        # below the panel: points are not hidden under it
        ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=4,
                  frameon=False)
    return save(fig, path)


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


def write_report(records: list[dict[str, Any]], g: dict[str, Any], args: argparse.Namespace, out: Path,
                 wall: float, measure: dict[str, Any]) -> dict[str, Any]:
    """Tables, decision, plots and the results file in ``out``; print and (``--tracking-uri``) log them."""
    rows = aggregate(records)
    decision = decide(rows, judge=args.judge)
    write_csv(out / "flatness_table.csv", rows)
    (out / "flatness_table.md").write_text(markdown_table(*dict_rows(rows, TABLE_COLUMNS)))
    dcols = list(dict.fromkeys(k for d in decision for k in d))
    if decision:
        write_csv(out / "flatness_decision.csv", decision)
    text = decision_text(decision, args.judge)
    (out / "flatness_decision.md").write_text(markdown_table(*dict_rows(decision, dcols))
                                              + "\n```\n" + text + "\n```\n")
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
