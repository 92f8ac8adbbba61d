"""zosam: ZO-SAM (zeroth-order sharpness-aware minimization) for efficient sparse training.

Data flow of the package: ``data`` -> ``models`` -> ``sparse`` (masks) -> ``optim`` ->
``engine`` (training loop) -> ``ray_train`` (Ray Train worker) -> ``sweep`` (Ray Tune +
Optuna) -> ``tracking`` (MLflow). Heavy dependencies (ray, mlflow) are imported lazily so
that ``import zosam`` and ``zosam --help`` stay fast.
"""

__version__ = "0.1.0"
