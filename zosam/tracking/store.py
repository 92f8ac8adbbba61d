"""The MLflow store: its URI (the default one, checked before any work), one client per
store, experiments, and the host-wide lock over a sqlite store's one-time work.

A sqlite store's schema and experiments are created under :func:`store_lock`, so runs
started together on a new store do not race; MLflow's database errors are logged as one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from zosam.validate import check_reachable, check_sqlite_path, check_tracking_uri_format

CONNECT_TIMEOUT_S = 5.0


class TrackingError(RuntimeError):
    """A write to (or read from) the MLflow store failed: the run ends ``failed`` with this reason."""


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a sqlite store ``mlflow.db`` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_tracking_uri(field: str, uri: str, *, timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """Check a tracking URI before any work: its form; a sqlite store's folder exists and is
    writable (nothing is created); a server answers a TCP connection within ``timeout_s``
    (MLflow itself retries for minutes)."""
    from urllib.parse import urlsplit

    check_tracking_uri_format(field, uri)
    scheme = uri.partition("://")[0].split("+")[0].lower()
    if scheme == "sqlite":
        check_sqlite_path(field, uri, uri.removeprefix("sqlite:///"), folder_must_exist=True)
    elif scheme in ("http", "https"):
        parts = urlsplit(uri)
        port = parts.port or (443 if scheme == "https" else 80)
        check_reachable(field, uri, parts.hostname, port, "MLflow server", timeout_s=timeout_s)
    return uri


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock over a sqlite store's one-time work (schema creation, experiment
    creation), shared by every process on the host: two runs started together on a new
    store would otherwise both create the schema ("table experiments already exists")."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    lock = db.with_name(db.name + ".lock")
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_ready: set[str] = set()


_ready: set[str] = set()


class _OneLine(logging.Filter):
    """MLflow logs each database error with its traceback and SQL before raising it (a full
    disk printed 13 chained tracebacks); the raised error becomes our ``TrackingError`` with
    the reason, so the log keeps only the first line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.msg, record.args = (record.getMessage().strip().splitlines() or [""])[0][:300], None
            record.exc_info = record.exc_text = None
        return True


def _quiet_mlflow_db_errors() -> None:
    log = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _OneLine) for f in log.filters):
        log.addFilter(_OneLine())


def client(uri: str):
    """An ``MlflowClient``; a sqlite store's schema is created once, under :func:`store_lock`."""
    from mlflow.tracking import MlflowClient

    _quiet_mlflow_db_errors()
    if not uri.startswith("sqlite:///") or uri in _ready:
        return MlflowClient(tracking_uri=uri)
    with store_lock(uri):
        c = MlflowClient(tracking_uri=uri)
        c.search_experiments(max_results=1)  # opens the store: creates and migrates the schema
    _ready.add(uri)
    return c



def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it if needed.

    A sqlite store gets an absolute artifact location beside the database, so artifacts
    land in the same place whatever the working directory (Ray trials change it).
    """
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    with store_lock(uri):
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return c.create_experiment(name, artifact_location=location)
        except Exception:  # created concurrently by another host (a server store): use theirs
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id
