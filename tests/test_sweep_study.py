"""Optuna's analysis of a sweep's study (``zosam.sweep.study``), on real in-process studies."""

from __future__ import annotations

import optuna
import pytest

from zosam.sweep import study as sweep_study


def _study(directions: list[str], objective, n: int = 12) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.create_study(directions=directions, sampler=optuna.samplers.RandomSampler(seed=0))
    s.optimize(objective, n_trials=n)
    return s


def test_importance_ranks_a_string_choice_that_decides_the_objective() -> None:
    """The hand-written |Spearman| dropped string choices; Optuna's fANOVA keeps them."""
    def f(t: optuna.Trial) -> float:
        method = t.suggest_categorical("sparse.method", ["rigl", "set"])
        return (1.0 if method == "rigl" else 0.0) + 0.01 * t.suggest_float("optimizer.rho", 0.01, 0.3, log=True)

    s = _study(["maximize"], f)
    imp = sweep_study.param_importances(s, seed=0)
    assert set(imp) == {"sparse.method", "optimizer.rho"}
    assert imp["sparse.method"] > 0.9 and sum(imp.values()) == pytest.approx(1.0)
    assert set(sweep_study.figures(s, ["test_acc"])) == {"optimization_history.png", "parallel_coordinate.png",
                                                        "param_importances.png"}


def test_trials_that_all_score_the_same_give_no_importance_and_still_plot() -> None:
    s = _study(["maximize", "minimize"], lambda t: (0.5, 3.0 + 0 * t.suggest_float("a", 0, 1)), n=4)
    assert sweep_study.param_importances(s) == {}
    assert set(sweep_study.figures(s, ["test_acc", "passes_backward"])) == {
        "optimization_history.png", "parallel_coordinate.png", "pareto_front.png"}
    sweep_study.name_objectives(s, ["test_acc", "passes_backward"])
    assert s.metric_names == ["test_acc", "passes_backward"]  # what optuna-dashboard labels the axes with
