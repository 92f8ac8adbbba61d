"""The ``zosam`` command line: ``train``, ``sweep``, ``demo``, ``compare``, ``bench``.

Heavy modules (torch, ray, mlflow) are imported inside the commands, so ``zosam --help``
and argument errors are instant. Results go to stdout; progress, warnings and errors to
stderr (``zosam.console``). ``KEY=VALUE`` positionals and ``--tracking-uri`` are spelled the
same on every command (``zosam.cliargs``). Bad input (a ``zosam.validate.ConfigError``, raised before
any work) exits with status 2 and a one-line message naming the field; a failed run
(diverged, MLflow unwritable) exits with status 3; any other error keeps its traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from zosam.cliargs import add_key_values, add_tracking_uri, parse_args

BENCHMARKS = {
    "step-cost": "zosam.bench.step_cost",
    "sparse": "zosam.bench.sparse_overhead",
    "data": "zosam.bench.data_speed",
    "accuracy": "zosam.bench.accuracy",
    "robustness": "zosam.bench.robustness",
    "convergence": "zosam.bench.convergence",
    "ddp-comm": "zosam.bench.ddp_comm",
    "cluster-overhead": "zosam.bench.cluster_overhead",
    "flatness": "zosam.bench.flatness",
}


def version() -> str:
    """The installed distribution's version (``unknown`` when run from a tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("zosam")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zosam", description="ZO-SAM sparse training, sweeps and comparisons.")
    p.add_argument("--version", action="version", version=f"zosam {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run one training from a YAML run config")
    t.add_argument("--config", "-c", default=None, help="run config YAML (configs/*.yaml)")
    add_key_values(t, help="run-config overrides, e.g. optimizer.rho=0.1 sparse.density=0.2")
    t.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    t.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue although the config differs from the checkpoint's "
                        "(the change is recorded in MLflow)")
    t.add_argument("--checkpoint-dir", default=None, help="default: checkpoint.dir or runs/<name>")
    add_tracking_uri(t, help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite)")
    t.add_argument("--workers", type=int, default=0,
                   help="Ray Train workers (DDP); 0 runs in this process (default)")
    t.add_argument("--use-gpu", action="store_true", help="with --workers: one GPU per worker")
    t.add_argument("--address", default=None, help="with --workers: Ray address (default: a local Ray)")

    s = sub.add_parser("sweep", help="run a Ray Tune + Optuna sweep from a spec in tune/")
    s.add_argument("spec", help="sweep spec YAML (tune/*.yaml)")
    s.add_argument("--address", default=None, help="Ray address ('auto' or host:port); default: a local Ray")
    s.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    add_tracking_uri(s, help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite)")
    s.add_argument("--storage-path", default=None,
                   help="Ray results root (default: spec, $ZOSAM_STORAGE_PATH or ./ray_results)")
    s.add_argument("--storage-endpoint", default=None,
                   help="S3-protocol endpoint for an s3:// storage path, e.g. http://127.0.0.1:9000 "
                        "(default: spec, else $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS)")
    s.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray (default: spec)")
    add_key_values(s, help="sweep-spec overrides, e.g. num_trials=4 base.epochs=2")

    d = sub.add_parser("demo", help="the quick sweep of `make demo` (tune/quick.yaml; digits when the CIFAR-10 "
                                    "JPEG archive is missing)")
    d.add_argument("--address", default=None, help="Ray address ('auto' or host:port); default: a local Ray")
    add_tracking_uri(d, help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite)")
    add_key_values(d, help="sweep-spec overrides, e.g. num_trials=4")

    c = sub.add_parser("compare", help="compare MLflow runs grouped over seeds; tables and plots")
    c.add_argument("--experiment", default=None, help="experiment name (default: all)")
    c.add_argument("--sweep", default=None, help="a sweep's name or parent run id")
    c.add_argument("--filter", default=None, help="an MLflow filter string, e.g. \"tags.`zosam.host` = 'rigl'\"")
    add_key_values(c, "tag", deprecated="--tag",
                   help="select runs by tag, e.g. optimizer=sgd host=rigl; KEY without a dot means zosam.KEY")
    add_tracking_uri(c, help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite)")
    c.add_argument("--out", default=None, help="folder for CSV, Markdown and PNG exports")
    c.add_argument("--log", action="store_true",
                   help="also log the exports as a comparison run to MLflow (default: write nothing there)")
    c.add_argument("--no-log", dest="log", action="store_false", help="the default: log nothing to MLflow")
    c.add_argument("--cost", default="train_time_s", choices=("train_time_s", "wall_time_s", "passes_backward"),
                   help="training cost on the accuracy-vs-cost (Pareto) plot")

    b = sub.add_parser("bench", help="run a benchmark (prints a table and one JSON line)")
    b.add_argument("name", choices=sorted(BENCHMARKS))
    b.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments (see --help)")
    return p


def _cmd_train(args: argparse.Namespace) -> int:
    from zosam.config import load_config
    from zosam.validate import in_range

    cfg = load_config(args.config, args.overrides)
    in_range("--workers", args.workers, 0, integer=True)
    if args.workers > 0:
        from zosam.ray_train import train_distributed

        outcome = train_distributed(cfg, num_workers=args.workers, use_gpu=args.use_gpu, address=args.address,
                                    tracking_uri=args.tracking_uri, resume=args.resume,
                                    checkpoint_dir=args.checkpoint_dir)
    else:
        from zosam.runner import run

        outcome = run(cfg, resume=args.resume, checkpoint_dir=args.checkpoint_dir, tracking_uri=args.tracking_uri,
                      allow_config_change=args.allow_config_change)
    return 0 if outcome.status == "finished" else 3


def _cmd_sweep(args: argparse.Namespace) -> int:
    from zosam.sweep import run_sweep

    result = run_sweep(args.spec, address=args.address, resume=args.resume, tracking_uri=args.tracking_uri,
                       storage_path=args.storage_path, num_cpus=args.num_cpus,
                       storage_endpoint=args.storage_endpoint, overrides=args.overrides)
    return 0 if result.completed else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from zosam.demo import QUICK_SPEC, demo_overrides
    from zosam.sweep import run_sweep

    result = run_sweep(QUICK_SPEC, address=args.address, tracking_uri=args.tracking_uri,
                       overrides=demo_overrides(args.overrides))
    return 0 if result.completed else 1


def _cmd_compare(args: argparse.Namespace) -> int:
    from zosam.compare import compare_main

    return compare_main(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(BENCHMARKS[args.name])
    module.main(args.args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from zosam.validate import ConfigError

    args = parse_args(build_parser(), argv)
    # SIGTERM (a scheduler's preemption, `kill`) unwinds like an exit, so a run records
    # its end in MLflow instead of staying RUNNING.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    handler = {"train": _cmd_train, "sweep": _cmd_sweep, "demo": _cmd_demo, "compare": _cmd_compare,
               "bench": _cmd_bench}
    try:
        return handler[args.command](args)
    except ConfigError as e:
        print(f"zosam {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"zosam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
