"""Benchmarks: each prints a table and one JSON line, and can log to MLflow.

Every benchmark module has ``main(argv=None)``; ``zosam bench <name>`` and
``python benchmarks/<name>.py`` both call it.
"""

from __future__ import annotations

import json
import platform
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain fixed-width table (floats with 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def emit(name: str, rows: Sequence[dict[str, Any]], summary: dict[str, Any], *,
         mlflow_uri: str | None = None, columns: Sequence[str] | None = None,
         artifacts: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Print the table and one JSON line; log them (and ``artifacts`` files) to MLflow when ``mlflow_uri`` is given."""
    record = {"benchmark": name, "machine": machine(), **summary, "rows": list(rows)}
    print(format_table(rows, columns))
    print(json.dumps(record, default=str))
    if mlflow_uri:
        import mlflow

        mlflow.set_tracking_uri(mlflow_uri)
        mlflow.set_experiment("zosam-benchmarks")
        with mlflow.start_run(run_name=name, tags={"zosam.benchmark": name}):
            mlflow.log_params({k: v for k, v in summary.items() if isinstance(v, str | int | float | bool)})
            metrics = {}
            for i, row in enumerate(rows):
                label = str(row.get("method", i))
                for k, v in row.items():
                    if isinstance(v, float | int) and not isinstance(v, bool):
                        metrics[re.sub(r"[^\w.\-/ ]", "_", f"{label}.{k}")] = float(v)
            mlflow.log_metrics(metrics)  # one batch: thousands of single calls are slow on sqlite
            mlflow.log_dict(record, f"{name}.json")
            for path in artifacts:
                mlflow.log_artifact(str(path))
    return record
