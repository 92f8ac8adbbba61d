"""The sweep's Optuna study: where it is stored, and Optuna's own analysis of it.

The study lives in an Optuna RDB storage (an SQLAlchemy URL) under the sweep's name, so
it outlives the driver: ``--resume`` continues it, and Optuna's tools open it::

    optuna-dashboard sqlite:////abs/ray_results/optuna.db --host 127.0.0.1 --port 8080
    python -c "import optuna; s = optuna.load_study(study_name='quick', \\
        storage='sqlite:////abs/ray_results/optuna.db'); print(s.best_trial)"

Parameter importance is Optuna's fANOVA (seeded; string choices included), and the plots
are ``optuna.visualization.matplotlib``'s, logged to the sweep's parent MLflow run.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from zosam.validate import ConfigError, check_reachable, check_sqlite_path, show

STUDY_FILE = "optuna.db"  # the local default, beside the sweep's outputs (one study per sweep name)
STORAGE_ENV = "ZOSAM_OPTUNA_STORAGE"
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")
CONNECT_TIMEOUT_S = 5.0


def check_storage_url_format(field: str, url: Any) -> str:
    """An Optuna RDB storage URL, by its form only: ``sqlite:////abs/path.db``,
    ``postgresql://user@host:5432/db`` or ``mysql://...`` (a ``+driver`` suffix allowed)."""
    hint = "e.g. sqlite:////abs/path/optuna.db or postgresql://user@host:5432/optuna"
    if not isinstance(url, str) or not url or any(c.isspace() or ord(c) < 32 for c in url):
        raise ConfigError(f"{field}={show(url)} is invalid; must be an Optuna storage URL, {hint}")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0].lower() not in STORAGE_SCHEMES:
        raise ConfigError(f"{field}={show(url)} is invalid; the scheme must be one of "
                          f"{', '.join(STORAGE_SCHEMES)} (optionally +driver), {hint}")
    if scheme == "sqlite" and (not rest.startswith("/") or rest.strip("/") in ("", ":memory:")):
        raise ConfigError(f"{field}={show(url)} is invalid; a sqlite storage is sqlite:///<absolute path of the "
                          ".db file> (an in-memory study would be lost with the driver)")
    return url


def resolve_storage(spec_storage: str | None, outputs: Path) -> tuple[str, str]:
    """``(url, where it came from)``: the spec's ``search.storage``, else ``$ZOSAM_OPTUNA_STORAGE``,
    else a sqlite file in the sweep's local outputs folder."""
    if spec_storage:
        return spec_storage, "search.storage"
    if os.environ.get(STORAGE_ENV):
        return check_storage_url_format(STORAGE_ENV, os.environ[STORAGE_ENV]), STORAGE_ENV
    return f"sqlite:///{outputs.resolve() / STUDY_FILE}", "--storage-path"


def check_storage(field: str, url: str, *, timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """Before any work: a sqlite file's folder is writable (nothing created); a database
    server answers a TCP connection within ``timeout_s``."""
    from urllib.parse import urlsplit

    check_storage_url_format(field, url)
    scheme = url.partition("://")[0].split("+")[0].lower()
    if scheme == "sqlite":
        check_sqlite_path(field, url, url.removeprefix(url.partition("://")[0] + ":///"))
        return url
    parts = urlsplit(url)
    port = parts.port or {"postgresql": 5432, "mysql": 3306}[scheme]
    check_reachable(field, url, parts.hostname or "localhost", port, "database", timeout_s=timeout_s)
    return url


@contextlib.contextmanager
def open_storage(url: str) -> Iterator[Any]:
    """An ``optuna.storages.RDBStorage`` (schema created on first use), its connections closed
    on leaving: Optuna leaves its SQLAlchemy pool to the garbage collector, which keeps a
    database server's connection slots until then and warns (psycopg) when it comes. A sqlite
    file waits for a lock instead of failing at once: the dashboard may be reading it."""
    import optuna

    kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    try:
        yield storage
    finally:
        storage.remove_session()
        storage.engine.dispose()


def study_exists(url: str, name: str) -> bool:
    """Whether the storage at ``url`` already holds a study named ``name`` (a sqlite file that
    does not exist yet holds none, and is not created here)."""
    import optuna

    if url.startswith("sqlite") and not Path(url.partition(":///")[2]).is_file():
        return False
    with open_storage(url) as storage:
        return name in optuna.study.get_all_study_names(storage)


def load(storage, name: str):
    """The sweep's study, read back from its storage."""
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def name_objectives(study, metrics: Sequence[str]) -> None:
    """Name the study's objectives after the sweep's metrics (optuna-dashboard shows them)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(metrics))


def _target(study, i: int) -> Callable[[Any], float] | None:
    """Objective ``i`` of a multi-objective study (Optuna's analyses need one number per trial)."""
    return (lambda t: t.values[i]) if len(study.directions) > 1 else None


def param_importances(study, *, seed: int = 0, objective: int = 0) -> dict[str, float]:
    """fANOVA importance of each parameter for objective ``objective`` (empty with fewer than
    two completed trials, or when they all scored the same). Choices, strings included, are
    categorical parameters to Optuna."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(done) < 2:
        return {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            imp = optuna.importance.get_param_importances(study, evaluator=evaluator,
                                                          target=_target(study, objective))
        except RuntimeError:  # fANOVA: every trial scored the same ("zero total variance")
            return {}
    return {k: float(v) for k, v in imp.items()}


def figures(study, metrics: Sequence[str], *, seed: int = 0) -> dict[str, Any]:
    """Optuna's matplotlib plots of the study, by artifact file name: the optimisation
    history, parameter importances, a parallel-coordinate plot and, with two or more
    objectives, the Pareto front. Plots that need more trials than there are are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    import optuna.visualization.matplotlib as ovm

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        return {}
    target, name = _target(study, 0), metrics[0]
    plots: dict[str, Callable[[], Any]] = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(study, target=target, target_name=name),
        "parallel_coordinate.png": lambda: ovm.plot_parallel_coordinate(study, target=target, target_name=name),
    }
    if len(done) >= 2:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        plots["param_importances.png"] = lambda: ovm.plot_param_importances(
            study, evaluator=evaluator, target=target, target_name=name)
    if len(study.directions) > 1:
        plots["pareto_front.png"] = lambda: ovm.plot_pareto_front(study, target_names=list(metrics))
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # matplotlib on one-trial axes: not the user's concern
        for file, plot in plots.items():
            try:
                ax = plot()
            except RuntimeError:  # importance of trials that all scored the same: nothing to plot
                continue
            ax = ax.flat[0] if hasattr(ax, "flat") else ax
            out[file] = ax.figure
    return out


def display_url(url: str) -> str:
    """``url`` with any password masked (it is printed and logged)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
