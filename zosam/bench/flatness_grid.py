"""The flatness grid: settings (data, model, default noise/methods/rho), and one run
config per (setting, noise, method, rho, seed)."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

from zosam.bench.step_cost import parse_method
from zosam.optim import OPTIMIZERS

BASELINE, REFERENCE = "sgd", "sam"
GUIDED = "zosam:directions=guided"

_COMMON_OPT = {"base": "sgd", "momentum": 0.9, "weight_decay": 5.0e-4}
NOISE = [0.0, 0.2, 0.4, 0.6]
DEFAULT_METHODS = ["sgd", "sam", "zosam", GUIDED, "rwp", "asyncsam", "msam", "esam", "looksam", "gsam"]
_DIGITS = {"data": {"name": "digits", "image_size": 8, "augment": False, "batch_size": 64, "eval_batch_size": 1000},
           "model": {"name": "mlp", "in_features": 192, "hidden": [256, 256]}, "epochs": 40, "lr": 0.1,
           "noise": NOISE, "methods": DEFAULT_METHODS, "rho": [0.1, 0.3]}
#: The benchmark's settings: run-config pieces, the default grid (noise, methods, rho; the
#: flags replace them for every setting), the label printed, and the judged target fraction.
SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {**_DIGITS, "sparse": {"method": "dense"}, "target": 0.8,
               "label": "digits 8x8, MLP 192-256-256-10, dense"},
    "digits-sparse": {**_DIGITS, "target": 0.6, "label": "digits 8x8, MLP, 90 % sparse (random ERK mask)",
                      "sparse": {"method": "random", "distribution": "erk", "density": 0.1,
                                 "dense_first_layer": False, "dense_classifier": True}},
    # A CNN step costs about 10x an MLP step here: fewer cells by default, and a smaller rho
    # (SAM at rho 0.2 does not train this model: 10 % test accuracy).
    "cifar": {"data": {"name": "cifar10-jpeg", "train_subset": 2000, "test_subset": 1000, "augment": False,
                       "batch_size": 64, "eval_batch_size": 500},
              "model": {"name": "lenet", "width": 8, "hidden": 128}, "epochs": 20, "lr": 0.05,
              "sparse": {"method": "dense"}, "target": 0.8, "noise": [0.0, 0.4], "rho": [0.05],
              "methods": ["sgd", "sam", "zosam", GUIDED, "rwp", "asyncsam", "msam"],
              "label": "CIFAR-10 JPEG copy, 2,000-image subset, LeNet (width 8)"},
}
QUICK = {"settings": ["digits"], "noise": [0.0, 0.4], "seeds": 2, "methods": ["sgd", "sam", "zosam", "rwp"],
         "rho": [0.3], "overrides": ["epochs=10"]}


def radius_param(name: str) -> str | None:
    """The optimizer's perturbation radius: ``rho``, else ``rho_max`` (GSAM's scheduled radius), else None."""
    params = inspect.signature(OPTIMIZERS.get(OPTIMIZERS.canonical(name))).parameters
    return next((k for k in ("rho", "rho_max") if k in params), None)


def method_label(name: str, kwargs: dict[str, Any]) -> str:
    """``zosam`` + ``{"directions": "guided"}`` -> ``zosam:directions=guided`` (the radius left out)."""
    radius = radius_param(name)
    rest = ",".join(f"{k}={v}" for k, v in kwargs.items() if k != radius)
    return f"{name}:{rest}" if rest else name


def run_config(setting: str, *, name: str, kwargs: dict[str, Any], rho: float | None, noise: float, seed: int,
               overrides: Sequence[str] = (), device: str = "cpu") -> dict[str, Any]:
    """The run-config mapping of one run (validated by ``RunConfig.from_dict``)."""
    from zosam.config import apply_overrides

    s = SETTINGS[setting]
    # "sgd" is the benchmarks' label for the base optimizer (SGD with momentum) alone
    opt = {"name": OPTIMIZERS.canonical(name), **_COMMON_OPT, "lr": s["lr"], **kwargs}
    if rho is not None:
        opt[radius_param(name) or "rho"] = rho
    cfg = {"seed": seed, "epochs": s["epochs"], "device": device,
           "data": {**s["data"], "label_noise": noise, "label_noise_seed": seed},
           "model": copy.deepcopy(s["model"]), "optimizer": opt, "sparse": dict(s["sparse"]),
           "eval": {"every": s["epochs"]}, "tracking": {"enabled": False}}
    cfg = apply_overrides(cfg, list(overrides))
    cfg["eval"] = {"every": cfg["epochs"]}  # the final epoch only (after overrides of epochs)
    key = f"{setting}-n{noise:g}-{method_label(name, kwargs)}" + (f"-rho{rho:g}" if rho is not None else "")
    cfg["name"] = f"flat-{key}-s{seed}".replace(":", "_").replace("=", "").replace(",", "_")
    return cfg


def grid(plan: dict[str, dict[str, Any]], seeds: int, overrides: Sequence[str] = (),
         device: str = "cpu") -> list[dict[str, Any]]:
    """Every run as a job description, seed-major (an interrupted run leaves whole seeds).

    ``plan`` maps each setting to its ``noise``, ``methods`` and ``rho`` lists.
    """
    jobs = []
    for seed in range(seeds):
        for setting, p in plan.items():
            parsed = [parse_method(m) for m in p["methods"]]
            for n in p["noise"]:
                for name, kwargs in parsed:
                    radius = radius_param(name)
                    grid_rho = radius is not None and radius not in kwargs
                    for rho in (p["rho"] if grid_rho else [None]):
                        jobs.append({"setting": setting, "noise": float(n), "method": method_label(name, kwargs),
                                     "rho": rho if rho is not None else kwargs.get(radius), "seed": seed,
                                     "config": run_config(setting, name=name, kwargs=kwargs, rho=rho, noise=n,
                                                          seed=seed, overrides=overrides, device=device)})
    return jobs
