"""Property-based fuzzing of everything a user types: run configs (files and overrides) and
sweep specs, valid and broken.

The property: loading either succeeds or raises ``zosam.validate.ConfigError`` with one
bounded line that names what is wrong (a field, an override, the file); never any other
exception, and nothing is created on disk before validation is over. Examples are
derandomized (the same on every run and machine) and bounded (well under a minute).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zosam.config import RunConfig, load_config
from zosam.sweep import SPEC_KEYS, load_spec
from zosam.validate import MAX_MESSAGE, ConfigError

FUZZ = settings(derandomize=True, deadline=None, max_examples=120, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# A small valid run (cheap to validate) that mutations start from.
VALID: dict[str, Any] = {
    "name": "fuzz", "seed": 1, "epochs": 2, "max_steps_per_epoch": 2,
    "data": {"name": "digits", "image_size": 8, "batch_size": 16},
    "model": {"name": "mlp", "in_features": 192, "hidden": [8, 8]},
    "optimizer": {"name": "zosam", "base": "sgd", "lr": 0.1, "rho": 0.05, "mu": 1e-3, "q": 1},
    "sparse": {"method": "rigl", "density": 0.5, "update_interval": 2},
    "schedule": {"warmup_epochs": 0.5}, "checkpoint": {"every": 1},
    "eval": {"every": 1}, "tracking": {"experiment": "fuzz"},
}
SPEC: dict[str, Any] = {
    "name": "fuzz-sweep", "base": VALID,
    "space": {"optimizer.rho": {"loguniform": [0.01, 0.5]}, "optimizer.q": {"choice": [1, 2]}},
    "objectives": [{"metric": "test_acc", "mode": "max"}], "search": {"sampler": "tpe", "seed": 0},
    "scheduler": {"type": "asha", "grace_period": 1}, "num_trials": 2,
    "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 1}, "ray": {"num_cpus": 2},
    "tracking": {"experiment": "fuzz-sweeps"},
}

FIELDS = sorted({f"{k}.{leaf}" if isinstance(v, dict) else k for k, v in VALID.items()
                 for leaf in (v if isinstance(v, dict) else [None])}
                | {"device", "amp", "dtype", "label_smoothing", "checkpoint.dir", "checkpoint.keep",
                   "eval.corruptions", "eval.corruption_subset", "tracking.uri", "tracking.enabled",
                   "optimizer.momentum", "optimizer.weight_decay", "sparse.distribution", "data.eval_batch_size"})
# Words one of which every message must contain: what the user wrote, by name.
NAMES = ({f.split(".")[0] for f in FIELDS} | {f.split(".")[-1] for f in FIELDS}
         | {"override", "unknown key", "YAML", "space", "objectives", "search", "scheduler", "resources", "ray",
            "num_trials", "base", "storage_path", "overrides"})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["../../x", "a/b", "", ".", "..", "nan", "1e400", "sqlite:////no/such/x.db", "http://:0",
                     "zosam", "base", "sgd", "rigl", "digits", "mlp", "x" * 300, "\x00", "é", "[", "{a: 1"]),
)
# Plausible values (many of them valid somewhere) and anything at all.
plausible = st.one_of(st.integers(0, 4), st.floats(0.001, 1.0), st.sampled_from(
    ["base", "sgd", "adamw", "zosam", "sam", "rigl", "set", "dense", "erk", "uniform", "digits", "mlp", "tiny_cnn",
     "cpu", "auto", "off", "bf16", "float64", "tpe", "random", "none", "max", "min", "test_acc", [1, 2], [0.01, 0.5]]))
values = st.one_of(plausible, st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6))
keys = st.one_of(st.sampled_from(FIELDS), st.sampled_from(FIELDS), st.text(min_size=0, max_size=10))


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        nxt = d.get(p)
        if not isinstance(nxt, dict):
            nxt = d[p] = {}
        d = nxt
    d[leaf] = value


@st.composite
def mutated(draw, start: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    d = copy.deepcopy(start)
    for _ in range(draw(st.one_of(st.just(0), st.just(1), st.integers(0, 3)))):
        _set(d, draw(st.one_of(st.sampled_from(paths), st.sampled_from(paths), st.text(max_size=10))), draw(values))
    return d


def _yaml_text(v: Any) -> str:
    try:
        return yaml.safe_dump(v, default_flow_style=True, allow_unicode=True).strip().removesuffix("...").strip()
    except yaml.YAMLError:
        return str(v)


overrides = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={_yaml_text(v)}", st.sampled_from(FIELDS), plausible),
    st.builds(lambda k, v: f"{k}={_yaml_text(v)}", keys, values),
    st.builds(lambda k, t: f"{k}={t}", keys, st.text(max_size=10)),
    st.text(max_size=15),
), max_size=2) | st.just([])

config_texts = st.one_of(
    st.builds(lambda d: yaml.safe_dump(d, allow_unicode=True), mutated(VALID, FIELDS)),
    st.text(max_size=60),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["", "# only a comment\n", "a: 1\na: 2\n", "name: t\nepochs:\t3\n", "- 1\n- 2\n",
                     "name: !!python/object/apply:os.system [echo]\n", "a: &a [1, 2]\nb: [*a, *a]\n",
                     "name: [unclosed\n", "{", "name: ok\nseed: 99999999999999999999999\n"]),
)


def _check_error(e: ConfigError) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and len(msg) <= MAX_MESSAGE, msg[:2000]
    assert any(n in msg for n in NAMES if n), msg


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


@FUZZ
@given(cfg=mutated(VALID, FIELDS), extra=overrides)
def test_generated_configs_load_or_name_the_field(cfg: dict[str, Any], extra: list[str], empty_cwd: Path) -> None:
    before = _snapshot(empty_cwd)
    try:
        from zosam.config import apply_overrides

        RunConfig.from_dict(apply_overrides(cfg, extra))
    except ConfigError as e:
        _check_error(e)
    assert _snapshot(empty_cwd) == before  # nothing created by validation


@FUZZ
@given(text=config_texts, extra=overrides)
def test_generated_config_files_load_or_name_the_problem(text: str, extra: list[str], empty_cwd: Path) -> None:
    path = empty_cwd / "run.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if text.isascii() else text.encode("latin-1", "replace"))
    before = _snapshot(empty_cwd)
    try:
        load_config(path, extra)
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg) <= MAX_MESSAGE, msg[:2000]
        assert "run.yaml" in msg or any(n in msg for n in NAMES if n), msg
    assert _snapshot(empty_cwd) == before


SPEC_PATHS = sorted(SPEC_KEYS | {"space.optimizer.rho", "space.optimizer.rho.loguniform", "space.optimizer.q.choice",
                                 "search.seed", "search.points_to_evaluate", "scheduler.reduction_factor",
                                 "resources.workers_per_trial", "resources.cpus_per_trial", "ray.num_cpus",
                                 "objectives", "base.optimizer.lr", "base.name", "overrides.epochs",
                                 "space.sparse.density.uniform", "space.data.batch_size.randint", "num_trials"})


@FUZZ
@given(spec=mutated(SPEC, SPEC_PATHS), extra=st.lists(st.builds(lambda k, v: f"{k}={_yaml_text(v)}",
                                                                st.sampled_from(SPEC_PATHS), values), max_size=2))
def test_generated_sweep_specs_load_or_name_the_field(spec: dict[str, Any], extra: list[str],
                                                      empty_cwd: Path) -> None:
    before = _snapshot(empty_cwd)
    try:
        load_spec(spec, extra)
    except ConfigError as e:
        _check_error(e)
    assert _snapshot(empty_cwd) == before
    assert not os.path.exists(empty_cwd / "ray_results")
