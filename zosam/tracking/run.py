"""One MLflow run, addressed by id (no global active run, no ``MLFLOW_RUN_ID`` surprises):
params, metrics, tags, artifacts, the final model, the data set and system metrics.

Every call goes through the store's client and the run id it created or found, so a trial
inside Ray, a resumed run and a child of a sweep's parent run all log to exactly the run
they mean. MLflow's errors become one :class:`~zosam.tracking.store.TrackingError`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from zosam.tracking.store import TrackingError, client, ensure_experiment, store_lock

STATUS_TAG, REASON_TAG, KEY_TAG = "zosam.status", "zosam.failure_reason", "zosam.run_key"
KEY_HASH_TAG = "zosam.run_key_sha256"  # what lookups filter on: hex only, nothing to escape
MODEL_ID_TAG = "zosam.model_id"  # the run's final model (an MLflow LoggedModel id)
SYSTEM_METRICS_INTERVAL_S = 10.0  # one CPU/memory/GPU sample per 10 s: a few points per short run, cheap


_F = TypeVar("_F", bound=Callable[..., Any])


def _tracked(fn: _F) -> _F:
    """MLflow's errors (a full disk, a lost server, a locked database) become one ``TrackingError``
    whose message names the store, the operation and the cause's first line."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except TrackingError:
            raise
        except Exception as e:
            cause = (str(e).strip().splitlines() or [""])[0][:300]
            raise TrackingError(f"MLflow {fn.__name__} on {self.uri} failed: {type(e).__name__}: {cause}") from e

    return wrapper  # type: ignore[return-value]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optimizer": {"rho": 0.05}}`` -> ``{"optimizer.rho": "0.05"}`` (MLflow params are strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


class _DropModelNoise(logging.Filter):
    """MLflow warns on every pickled PyTorch model (ours are our own, loaded by our users) and
    announces each cleared active model: one line per run each, saying nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "Pickle or CloudPickle" not in msg and "Active model is cleared" not in msg


def _quiet_mlflow_pickle_warning() -> None:
    for name in ("mlflow.pytorch", "mlflow.tracking.fluent"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropModelNoise) for f in log.filters):
            log.addFilter(_DropModelNoise())


def run_key_hash(run_key: str) -> str:
    return hashlib.sha256(run_key.encode()).hexdigest()


class RunLogger:
    """One MLflow run, addressed by id.

    Args:
        uri: tracking URI.
        experiment: experiment name (created if missing).
        run_name: display name.
        tags: tags set at creation.
        parent_run_id: makes this a child run (sweeps).
        run_id: continue an existing run (resume) instead of creating one.
        run_key: a stable identity of the run (a sweep's parent id and trial id, a Ray
            Train run's storage path and name). An existing run with this key is continued,
            so a worker restarted before its first checkpoint does not open a second run.
    """

    @_tracked
    def __init__(self, uri: str, experiment: str, run_name: str, *, tags: Mapping[str, str] | None = None,
                 parent_run_id: str | None = None, run_id: str | None = None,
                 run_key: str | None = None) -> None:
        self.uri = uri
        self.client = client(uri)
        if run_id is None and run_key is not None:
            # By the key's hash (hex: nothing to escape in the filter), then the exact key.
            found = self.client.search_runs([ensure_experiment(uri, experiment)],
                                            filter_string=f"tags.`{KEY_HASH_TAG}` = '{run_key_hash(run_key)}'",
                                            max_results=10)
            found = [r for r in found if r.data.tags.get(KEY_TAG) == run_key]
            run_id = found[0].info.run_id if found else None
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            all_tags = {"mlflow.runName": run_name, **(tags or {})}
            if run_key:
                all_tags[KEY_TAG] = run_key
                all_tags[KEY_HASH_TAG] = run_key_hash(run_key)
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(ensure_experiment(uri, experiment), run_name=run_name,
                                         tags={k: str(v) for k, v in all_tags.items()})
            self.run_id = run.info.run_id

    @_tracked
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    @_tracked
    def logged_steps(self, metric: str = "train_loss") -> set[int]:
        """Steps at which ``metric`` is already logged (the epochs a resume must not log twice)."""
        return {m.step for m in self.client.get_metric_history(self.run_id, metric)}

    @_tracked
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, *,
                    model_id: str | None = None) -> None:
        """Numeric values only; ``model_id`` links them to a logged model as well as the run (and
        those named ``*test*`` to the run's ``test`` data set, when ``log_dataset`` recorded one)."""
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        test = getattr(self, "_test_dataset", (None, None)) if model_id else (None, None)
        batch = [Metric(k, float(v), ts, step or 0, model_id=model_id,
                        **dict(zip(("dataset_name", "dataset_digest"), test if "test" in k else (None, None),
                                   strict=True)))
                 for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 500])

    @_tracked
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    @_tracked
    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    @_tracked
    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        self.log_text(yaml.safe_dump(dict(d), sort_keys=False), artifact_file)

    def log_figure(self, fig, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            fig.savefig(path, dpi=100, bbox_inches="tight")
            self.log_file(path, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    @_tracked
    def log_model(self, model, *, input_shape: Sequence[int], name: str = "model") -> str:
        """Log ``model`` (a ``torch.nn.Module``) as an MLflow LoggedModel of this run; returns its id
        (also set as the run's ``zosam.model_id`` tag). A CPU copy in eval mode is logged, with a
        signature (a float32 batch of ``input_shape`` -> logits), so it loads anywhere::

            mlflow.pytorch.load_model(f"models:/{model_id}")
        """
        import copy

        import mlflow
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        cpu = copy.deepcopy(model).to("cpu", torch.float32).eval()
        with torch.no_grad():
            classes = int(cpu(torch.zeros(1, *input_shape)).shape[-1])
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]))
        # log_model links the model to the active run: this run, for the duration of the call only.
        # The process-wide experiment is set to the run's own: one left by other code in this
        # process (a benchmark, a notebook) would make start_run refuse the run.
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(experiment_id=self.client.get_run(self.run_id).info.experiment_id)
        with mlflow.start_run(run_id=self.run_id):
            # The pickled module (not a traced pt2 graph): sparse models and any batch size load as trained.
            # Requirements given, not inferred (inference runs a subprocess: ~8 s a model). Loading
            # needs zosam importable too (the model classes are pickled by reference).
            _quiet_mlflow_pickle_warning()
            info = mlflow.pytorch.log_model(cpu, name=name, signature=signature, serialization_format="pickle",
                                            pip_requirements=mlflow.pytorch.get_default_pip_requirements())
        # log_model makes the model the process's "active model", which would link every later
        # metric (system metrics, the next run in this worker) to it: only ours are linked.
        mlflow.clear_active_model()
        self.client.update_run(self.run_id, status="RUNNING")  # start_run's exit ended it; end() does that
        self.client.set_tag(self.run_id, MODEL_ID_TAG, info.model_id)
        return info.model_id

    @_tracked
    def log_dataset(self, name: str, splits: Mapping[str, Any], *, source: str,
                    meta: Mapping[str, Any] | None = None) -> dict[str, str]:
        """Record the run's data set with ``mlflow.data``: one input per split (context
        ``train`` / ``test``), named ``name``, with a digest of the split's content (its
        tensors when it holds them, else ``meta``) and the subset sizes as its profile.
        Returns the digests by split."""
        import json
        import time

        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs, digests = [], {}
        for split, data in splits.items():
            digest = _content_digest(data, {"name": name, "split": split, **(meta or {})})
            ds = MetaDataset(CodeDatasetSource({"source": source, "split": split}), name=name, digest=digest)
            entity = Dataset(**{**ds.to_dict(), "profile": json.dumps({"split": split, "num_examples": len(data),
                                                                       **{k: v for k, v in (meta or {}).items()
                                                                          if "subset" in k or "size" in k}})})
            inputs.append(DatasetInput(entity, [InputTag("mlflow.data.context", split)]))
            digests[split] = digest
        if "test" in digests:
            self._test_dataset = (name, digests["test"])
        # Runs of one experiment (a sweep's trials) record the same data set: the store inserts
        # its row once, and two inserts at once break its unique key. The host lock orders them
        # on a sqlite store; a server's store gets one retry, which finds the row there.
        for attempt in range(2):
            try:
                with store_lock(self.uri):
                    self.client.log_inputs(self.run_id, datasets=inputs)
                break
            except Exception:
                if attempt:
                    raise
                time.sleep(0.5)
        return digests

    def start_system_metrics(self, *, resume: bool = False, interval_s: float | bool = True) -> bool:
        """Every ``interval_s`` seconds (``True``: ``SYSTEM_METRICS_INTERVAL_S``), sample CPU, memory,
        disk, network (and GPU when MLflow finds one) into this run's ``system/*`` metrics until
        ``end``. Needs psutil; without it, says so once and returns False."""
        try:
            import psutil  # noqa: F401  (MLflow's monitors need it)
        except ImportError:
            logging.getLogger(__name__).warning("system metrics are off: psutil is not installed")
            return False
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Its start/stop/"no GPU" lines are four INFO lines per run on stderr: warnings only.
        logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.WARNING)

        interval = SYSTEM_METRICS_INTERVAL_S if interval_s is True else float(interval_s)
        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, samples_before_logging=1,
                                             resume_logging=resume, tracking_uri=self.uri)
        self._monitor.start()
        return True

    def stop_system_metrics(self) -> None:
        monitor, self._monitor = getattr(self, "_monitor", None), None
        if monitor is not None:
            with contextlib.suppress(Exception):  # the last sample is not worth failing a run over
                monitor.finish()

    @_tracked
    def end(self, status: str, reason: str | None = None) -> None:
        """``status``: ``finished``, ``stopped_early`` or ``failed`` (MLflow: FINISHED/KILLED/FAILED)."""
        self.stop_system_metrics()
        tags = {STATUS_TAG: status}
        if reason:
            tags[REASON_TAG] = reason[:5000]
        self.set_tags(tags)
        mlflow_status = {"finished": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED"}[status]
        self.client.set_terminated(self.run_id, status=mlflow_status)


def _content_digest(data: Any, meta: Mapping[str, Any]) -> str:
    """A short sha256 of a split: its images and labels when it holds them as tensors, plus ``meta``."""
    import json

    h = hashlib.sha256(json.dumps(dict(meta), sort_keys=True, default=str).encode())
    for attr in ("images", "labels"):
        t = getattr(data, attr, None)
        if t is not None and hasattr(t, "numpy"):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
