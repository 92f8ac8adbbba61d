"""MLflow tracking with explicit run ids (no global active run, no ``MLFLOW_RUN_ID`` surprises).

Everything goes through one ``MlflowClient`` and the run id it created, so a trial inside
Ray, a resumed run and a child of a sweep's parent run all log to exactly the run they
mean. Names of tags, params and metrics: ``docs/design.md``.

- :mod:`~zosam.tracking.store`: the store's URI and its checks, one client per store,
  experiments, the host-wide lock over a sqlite store's one-time work;
- :mod:`~zosam.tracking.run`: :class:`RunLogger`, one run (params, metrics, artifacts,
  model, data set, system metrics), and the run's tags.
"""

from __future__ import annotations

from zosam.tracking.run import (
    KEY_HASH_TAG,
    KEY_TAG,
    MODEL_ID_TAG,
    REASON_TAG,
    STATUS_TAG,
    SYSTEM_METRICS_INTERVAL_S,
    RunLogger,
    flatten,
    run_key_hash,
)
from zosam.tracking.store import (
    CONNECT_TIMEOUT_S,
    TrackingError,
    check_tracking_uri,
    client,
    default_tracking_uri,
    ensure_experiment,
    store_lock,
)

__all__ = [
    "CONNECT_TIMEOUT_S",
    "KEY_HASH_TAG",
    "KEY_TAG",
    "MODEL_ID_TAG",
    "REASON_TAG",
    "STATUS_TAG",
    "SYSTEM_METRICS_INTERVAL_S",
    "RunLogger",
    "TrackingError",
    "check_tracking_uri",
    "client",
    "default_tracking_uri",
    "ensure_experiment",
    "flatten",
    "run_key_hash",
    "store_lock",
]
