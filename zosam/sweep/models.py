"""The sweep's best model in the MLflow Model Registry: the best trial's LoggedModel becomes a
new version of the registered model ``tracking.registered_model``, with the alias ``best``::

    mlflow.pytorch.load_model("models:/<registered model>@best")
"""

from __future__ import annotations

from typing import Any

from zosam.tracking import MODEL_ID_TAG, client

BEST_ALIAS = "best"


def register_best(uri: str, name: str, trial: dict[str, Any], *, sweep: str) -> dict[str, str] | None:
    """Register ``trial``'s logged model under ``name`` and point the alias ``best`` at it.

    Returns ``{"name", "version", "model_id"}``, or ``None`` when the trial logged no model
    (``tracking.log_model: false``). A resumed sweep registers a new version and moves the alias.
    """
    c = client(uri)
    run_id = trial.get("mlflow_run_id")
    model_id = c.get_run(run_id).data.tags.get(MODEL_ID_TAG) if run_id else None
    if not model_id:
        return None
    import mlflow

    # register_model resolves ``models:/<id>`` through the process's tracking URI: this store's.
    mlflow.set_tracking_uri(uri)
    mv = mlflow.register_model(f"models:/{model_id}", name,
                               tags={"zosam.sweep": sweep, "zosam.trial_id": str(trial["trial_id"])})
    c.update_registered_model(name, description=f"best model of the zosam sweep {sweep!r} (alias '{BEST_ALIAS}')")
    c.set_registered_model_tag(name, "zosam.sweep", sweep)
    c.set_registered_model_alias(name, BEST_ALIAS, mv.version)
    return {"name": name, "version": str(mv.version), "model_id": model_id}
