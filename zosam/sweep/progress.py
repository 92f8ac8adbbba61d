"""The driver's view of a running sweep: a progress bar with ETA (trials done / total) and
one line per reported epoch, stopped, restarted or failed trial, all on stderr; and the
MLflow status of trials Tune stopped or lost."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from zosam.console import eprint, progress_bar
from zosam.sweep.spec import SweepSpec

try:  # Tune pickles the callback with the experiment; the bar and the clock are per process
    from ray.tune import Callback
except ImportError:  # pragma: no cover - ray is a core dependency
    Callback = object  # type: ignore[assignment,misc]


def trial_error(trial) -> str:
    """The last line of a trial's error file that names the error (or its last line)."""
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text() if path and Path(path).is_file() else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "TrialFailed" in ln or "Diverged" in ln or "Error" in ln:
            return ln.strip()[:500]
    return lines[-1][:500] if lines else "trial failed"


class SweepCallback(Callback):
    """Driver-side Tune callback. The bar is drawn only when stderr is a terminal (a log file
    or a pipe gets the plain lines only)."""

    def __init__(self, spec: SweepSpec, tracking_uri: str) -> None:
        self.name, self.num_trials = spec.name, spec.num_trials
        self.epochs = int(spec.base.get("epochs", 10))
        self.primary = spec.objectives[0]["metric"]
        self.scheduler, self.max_failures = spec.scheduler["type"], spec.resources["max_failures"]
        self.experiment, self.tracking_uri = spec.tracking["experiment"], tracking_uri
        self._bar: Any = None
        self._t0: float | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bar": None, "_t0": None}

    # -- output ------------------------------------------------------------------------------
    def _line(self, text: str) -> None:
        eprint(text)

    def _advance(self, trials, ended=None) -> int:
        done = sum(t is ended or t.status in ("TERMINATED", "ERROR") for t in trials)
        if self._t0 is None:
            self._t0 = time.perf_counter()
            self._bar = progress_bar(total=self.num_trials, initial=done, desc=f"sweep {self.name}", unit="trial",
                                     leave=True)
        if self._bar is not None and done > self._bar.n:
            self._bar.update(done - self._bar.n)
        return done

    # -- Tune's hooks ------------------------------------------------------------------------
    def on_trial_result(self, iteration, trials, trial, result, **info):
        done = self._advance(trials)
        value = result.get(self.primary)
        self._line(f"[{time.perf_counter() - (self._t0 or 0.0):6.0f}s] trial {trial.trial_id} epoch "
                   f"{result.get('epoch')}/{self.epochs} {self.primary}={value if value is None else round(value, 4)}"
                   f"  ({done}/{self.num_trials} trials done)")

    def _finish(self, trial, status: str, reason: str | None = None) -> None:
        from zosam.tracking import RunLogger

        run_id = (trial.last_result or {}).get("mlflow_run_id")
        if run_id:
            RunLogger(self.tracking_uri, self.experiment, "", run_id=run_id).end(status, reason)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._advance(trials, trial)
        last = trial.last_result or {}
        if last.get("epoch", self.epochs) < self.epochs:  # ASHA (or max_t) stopped it
            self._finish(trial, "stopped_early", f"stopped by the scheduler after epoch {last.get('epoch')}")
            self._line(f"trial {trial.trial_id} stopped early by {self.scheduler} at epoch {last.get('epoch')}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._line(f"trial {trial.trial_id} failed ({trial_error(trial)}); restarting from its last checkpoint, "
                   f"retry {trial.num_failures}/{self.max_failures}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._advance(trials, trial)
        reason = trial_error(trial)
        if (trial.last_result or {}).get("mlflow_run_id"):  # the run logged its failure when it could
            self._finish(trial, "failed", reason)
        self._line(f"trial {trial.trial_id} FAILED: {reason}")

    def on_experiment_end(self, trials, **info):
        self._advance(trials)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
