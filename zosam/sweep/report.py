"""A finished (or resumed-to-the-end) sweep's results: the leaderboard, the best config, and
what the parent MLflow run records (best objective metrics, the best model registered, the
Optuna study's importance and plots)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zosam.config import apply_overrides
from zosam.pareto import pareto_front
from zosam.sweep import study as optuna_study
from zosam.sweep.models import register_best
from zosam.sweep.spec import SweepSpec
from zosam.tables import format_rows
from zosam.tracking import RunLogger


@dataclass
class SweepResult:
    """What ``run_sweep`` returns: every trial's row, the best (or the Pareto front), where
    the best config was written, and the registered best model (``None`` without models)."""

    completed: bool
    trials: list[dict[str, Any]]
    best: list[dict[str, Any]]
    parent_run_id: str
    best_config_path: Path | None
    storage: Path
    study_name: str = ""
    study_storage: str = ""
    registered_model: dict[str, str] | None = None
    importances: dict[str, float] | None = None


def trial_rows(spec: SweepSpec, grid, retries: dict[str, int]) -> list[dict[str, Any]]:
    """One row per Tune result: status, sampled params, retries, the objective metrics."""
    metrics = [o["metric"] for o in spec.objectives]
    epochs = int(spec.base.get("epochs", 10))
    rows = []
    for r in grid:
        m = r.metrics or {}
        params = {k: v for k, v in (r.config or {}).items() if k != "_zosam"}
        status = "failed" if r.error else ("stopped_early" if m.get("epoch", 0) < epochs else "finished")
        trial_id = m.get("trial_id") or Path(r.path).name
        rows.append({"trial_id": trial_id, "status": status, "params": params,
                     "retries": retries.get(trial_id, 0), "max_failures": spec.resources["max_failures"],
                     **{k: m.get(k) for k in (*metrics, "epoch", "train_time_s", "passes_backward",
                                              "mlflow_run_id", "time_total_s")}})
    return rows


def best_trials(spec: SweepSpec, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The best trial (one objective) or the Pareto front of the finished trials (several)."""
    metrics = [o["metric"] for o in spec.objectives]
    modes = [o["mode"] for o in spec.objectives]
    ok = [t for t in trials if t["status"] != "failed" and all(t.get(k) is not None for k in metrics)]
    if spec.multi_objective:
        full = [t for t in ok if t["status"] == "finished"] or ok
        return [full[i] for i in pareto_front([[t[k] for k in metrics] for t in full], modes)]
    return sorted(ok, key=lambda t: t[metrics[0]], reverse=modes[0] == "max")[:1]


def best_metrics(spec: SweepSpec, best: list[dict[str, Any]]) -> dict[str, float]:
    """``best_trial.<metric>`` for each objective: the best value among the best trials (the
    parent run's sortable summary in the MLflow UI; a trial's own ``best_test_acc`` is its
    best epoch, a different thing)."""
    out = {}
    for o in spec.objectives:
        values = [t[o["metric"]] for t in best if t.get(o["metric"]) is not None]
        if values:
            out[f"best_trial.{o['metric']}"] = float(max(values) if o["mode"] == "max" else min(values))
    return out


def leaderboard(trials: list[dict[str, Any]], metrics: list[str], keys: list[str], best) -> str:
    """The trials as a text table; ``*`` marks the best (or the Pareto front)."""
    best_ids = {t["trial_id"] for t in best}
    rows = []
    for t in trials:
        row = {"": "*" if t["trial_id"] in best_ids else "", "trial": t["trial_id"], "status": t["status"],
               "epochs": t.get("epoch"), "retries": f"{t.get('retries', 0)}/{t.get('max_failures', 0)}"}
        row.update({k: t.get(k) for k in metrics})
        row.update({k.split(".")[-1]: t["params"].get(k) for k in keys})
        rows.append(row)
    return format_rows(rows)


def report(spec: SweepSpec, grid, *, parent_run_id: str, uri: str, outputs: Path, out, ray_dir: str,
           retries: dict[str, int], study_url: str, study_storage) -> SweepResult:
    """Print the leaderboard, write the best config, and complete the parent MLflow run."""
    metrics = [o["metric"] for o in spec.objectives]
    modes = [o["mode"] for o in spec.objectives]
    trials = trial_rows(spec, grid, retries)
    best = best_trials(spec, trials)
    order = sorted(trials, key=lambda t: (t["status"] == "failed", -(t.get(metrics[0]) or -math.inf)
                                          if modes[0] == "max" else (t.get(metrics[0]) or math.inf)))
    out(f"\nsweep {spec.name!r}: {len(trials)} trials "
        f"({sum(t['status'] == 'finished' for t in trials)} finished, "
        f"{sum(t['status'] == 'stopped_early' for t in trials)} stopped early, "
        f"{sum(t['status'] == 'failed' for t in trials)} failed)")
    out(leaderboard(order, metrics, list(spec.space), best))
    parent = RunLogger(uri, spec.tracking["experiment"], spec.name, run_id=parent_run_id)
    best_path, registered = None, None
    if best:
        best_cfg = apply_overrides(spec.base, [f"{k}={json.dumps(v)}" for k, v in best[0]["params"].items()])
        best_cfg["name"] = f"{spec.name}-best"
        best_path = outputs / f"{spec.name}-best.yaml"
        best_path.write_text(yaml.safe_dump(best_cfg, sort_keys=False))
        parent.log_dict(best_cfg, "best_config.yaml")
        parent.log_dict({"front" if spec.multi_objective else "best": best}, "best_trials.yaml")
        parent.log_metrics(best_metrics(spec, best))
        out(f"best config: {best_path}  (run it: zosam train --config {best_path})")
        registered = register_best(uri, spec.tracking["registered_model"], best[0], sweep=spec.name)
        if registered:
            parent.set_tags({"zosam.best_model": f"models:/{registered['name']}/{registered['version']}"})
            out(f"best model: models:/{registered['name']}@best (version {registered['version']}; "
                f"load it: mlflow.pytorch.load_model('models:/{registered['name']}@best'))")
    importances = _log_study(parent, spec, study_storage)
    parent.log_dict({"trials": trials}, "trials.yaml")
    parent.end("finished")
    out(f"results: Ray {ray_dir}; MLflow {uri} (experiment {spec.tracking['experiment']!r}, "
        f"parent run {parent_run_id}); Optuna study {spec.name!r} in {optuna_study.display_url(study_url)}")
    if uri.startswith("sqlite:"):
        out(f"look at it: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000  "
            "(then open http://127.0.0.1:5000)")
    out(f"  optuna-dashboard {optuna_study.display_url(study_url)} --host 127.0.0.1 --port 8080  "
        "(then open http://127.0.0.1:8080)")
    completed = all(t["status"] != "failed" for t in trials) or bool(best)
    return SweepResult(completed, trials, best, parent_run_id, best_path, outputs, spec.name, study_url,
                       registered, importances)


def _log_study(parent: RunLogger, spec: SweepSpec, storage) -> dict[str, float]:
    """Optuna's importance (as ``importance.<param>`` metrics and a YAML) and plots on the parent run."""
    import matplotlib.pyplot as plt

    st = optuna_study.load(storage, spec.name)
    optuna_study.name_objectives(st, [o["metric"] for o in spec.objectives])
    seed = spec.search["seed"]
    importances = optuna_study.param_importances(st, seed=seed)
    if importances:
        parent.log_dict({"evaluator": "fANOVA (optuna.importance)", "objective": spec.objectives[0]["metric"],
                         "importance": importances}, "param_importances.yaml")
        parent.log_metrics({f"importance.{k}": v for k, v in importances.items()})
    for file, fig in optuna_study.figures(st, [o["metric"] for o in spec.objectives], seed=seed).items():
        parent.log_figure(fig, f"plots/{file}")
        plt.close(fig)
    return importances
