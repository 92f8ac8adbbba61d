"""Sweep specs are rejected before Ray starts, with a message naming the key; Pareto fronts.

Pure validation: nothing here starts Ray (``load_spec`` and ``check_cluster_can_run``
take plain data).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from zosam.pareto import pareto_front
from zosam.sweep import check_cluster_can_run, load_spec, trial_resources
from zosam.validate import ConfigError

ROOT = Path(__file__).resolve().parent.parent

BASE: dict[str, Any] = {
    "name": "spec-test",
    "base": {"epochs": 2, "data": {"name": "digits", "batch_size": 32}, "model": {"name": "mlp", "hidden": [16, 16]},
             "optimizer": {"name": "zosam", "base": "sgd", "lr": 0.05, "rho": 0.05, "mu": 1e-3, "q": 1},
             "sparse": {"method": "rigl", "density": 0.2, "update_interval": 5}},
    "space": {"optimizer.rho": {"loguniform": [0.01, 0.3]}, "optimizer.q": {"choice": [1, 2]},
              "sparse.update_interval": {"randint": [2, 8]}},
    "objectives": [{"metric": "test_acc", "mode": "max"}],
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "num_trials": 3,
    "resources": {"cpus_per_trial": 1, "workers_per_trial": 0, "max_concurrent_trials": 2},
}


def spec(**changes: Any) -> dict[str, Any]:
    """A copy of the valid base spec with top-level ``changes`` (``None`` deletes a key)."""
    d = copy.deepcopy(BASE)
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def with_space(**dists: Any) -> dict[str, Any]:
    """The base spec with extra/replaced space entries (``a__b`` stands for ``a.b``)."""
    space = copy.deepcopy(BASE["space"])
    space.update({k.replace("__", "."): v for k, v in dists.items()})
    return spec(space=space)


def test_the_base_spec_is_valid() -> None:
    s = load_spec(spec())
    assert s.name == "spec-test" and s.num_trials == 3 and not s.multi_objective
    assert set(s.space) == {"optimizer.rho", "optimizer.q", "sparse.update_interval"}
    assert s.base["name"] == "spec-test"  # the base run gets the sweep's name


@pytest.mark.parametrize("path", sorted((ROOT / "tune").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_load(path: Path) -> None:
    s = load_spec(path)
    assert s.space and s.num_trials >= 1


@pytest.mark.parametrize(("bad", "key"), [
    (spec(nmu_trials=3), "nmu_trials"),
    (spec(scheduler={"type": "asha", "grace": 1}), "scheduler.grace"),
    (spec(resources={"cpus_per_trail": 1}), "resources.cpus_per_trail"),
    (spec(search={"sampler": "tpe", "seeed": 1}), "search.seeed"),
    (spec(objectives=[{"metric": "test_acc", "mode": "max", "weight": 1}]), "objectives[0].weight"),
    (spec(tracking={"experment": "x"}), "tracking.experment"),
    (spec(ray={"num_cpu": 2}), "ray.num_cpu"),
])
def test_unknown_key_is_named(bad: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError) as e:
        load_spec(bad)
    assert f"unknown key {key}" in str(e.value)


@pytest.mark.parametrize(("dist", "key"), [
    ({"loguniform": [0.3, 0.01]}, "space.optimizer.rho.loguniform"),   # inverted
    ({"uniform": [0.1, 0.1]}, "space.optimizer.rho.uniform"),          # empty
    ({"randint": [5, 2]}, "space.optimizer.rho.randint"),              # inverted integers
    ({"choice": []}, "space.optimizer.rho.choice"),                    # empty choice
    ({"uniform": [0.1]}, "space.optimizer.rho.uniform"),               # not [low, high]
    ({"normal": [0.0, 1.0]}, "space.optimizer.rho distribution"),      # unknown distribution
    ({"uniform": [0.1, "x"]}, "space.optimizer.rho.uniform high"),     # not a number
])
def test_bad_range_is_named(dist: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError) as e:
        load_spec(with_space(optimizer__rho=dist))
    assert key in str(e.value)


@pytest.mark.parametrize("low", [0.0, -1e-3])
def test_loguniform_needs_a_positive_low(low: float) -> None:
    with pytest.raises(ValueError, match=r"space\.optimizer\.mu\.loguniform low"):
        load_spec(with_space(optimizer__mu={"loguniform": [low, 1e-2]}))


@pytest.mark.parametrize("key", ["optimizer.rhoo", "sparse.desnity", "data.nothing", "nosuchsection.x"])
def test_space_key_that_is_not_a_run_config_field(key: str) -> None:
    s = spec()
    s["space"][key] = {"uniform": [0.1, 0.2]}
    with pytest.raises(ValueError) as e:
        load_spec(s)
    assert f"space.{key} is not a field of the run config" in str(e.value)


@pytest.mark.parametrize(("key", "dist", "field"), [
    ("optimizer.rho", {"uniform": [0.0, 0.1]}, "optimizer.rho"),        # rho must be > 0
    ("sparse.density", {"uniform": [0.1, 1.5]}, "sparse.density"),      # density <= 1
    ("optimizer.q", {"choice": [1, 0]}, "optimizer.q"),                 # q >= 1
    ("sparse.drop_fraction", {"uniform": [0.1, 1.0]}, "sparse.drop_fraction"),
])
def test_a_range_end_that_makes_an_invalid_run(key: str, dist: dict[str, Any], field: str) -> None:
    s = spec()
    s["space"][key] = dist
    with pytest.raises(ValueError) as e:
        load_spec(s)
    msg = str(e.value)
    assert msg.startswith("space:") and field in msg


def test_a_point_to_evaluate_outside_the_run_config_is_rejected() -> None:
    s = spec(search={"points_to_evaluate": [{"optimizer.rho": 0.05, "optimizer.mu": 1e-3}]})
    with pytest.raises(ValueError, match=r"unknown key search\.points_to_evaluate\[0\]\.optimizer\.mu"):
        load_spec(s)
    s = spec(search={"points_to_evaluate": [{"optimizer.rho": -1.0}]})
    with pytest.raises(ValueError, match=r"optimizer\.rho"):
        load_spec(s)


def test_asha_with_two_objectives_is_refused() -> None:
    objectives = [{"metric": "test_acc", "mode": "max"}, {"metric": "passes_backward", "mode": "min"}]
    with pytest.raises(ValueError, match=r"scheduler\.type=asha needs one objective"):
        load_spec(spec(objectives=objectives))
    s = load_spec(spec(objectives=objectives, scheduler={"type": "none"}))
    assert s.multi_objective


@pytest.mark.parametrize(("bad", "key"), [
    (spec(objectives=[{"metric": "accuracy", "mode": "max"}]), "objectives[0].metric"),
    (spec(objectives=[{"metric": "test_acc", "mode": "maximise"}]), "objectives[0].mode"),
    (spec(num_trials=0), "num_trials"),
    (spec(scheduler={"type": "hyperband"}), "scheduler.type"),
    (spec(scheduler={"grace_period": 0}), "scheduler.grace_period"),
    (spec(search={"sampler": "cmaes"}), "search.sampler"),
    (spec(resources={"cpus_per_trial": 0}), "resources.cpus_per_trial"),
    (spec(resources={"workers_per_trial": -1}), "resources.workers_per_trial"),
    (spec(resources={"max_concurrent_trials": 0}), "resources.max_concurrent_trials"),
    (spec(name=""), "name"),
    (spec(space={}), "space"),
    (spec(base={"optimizer": {"name": "zosam", "rho": -1}}), "optimizer.rho"),
])
def test_other_bad_values_are_named(bad: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError) as e:
        load_spec(bad)
    assert key in str(e.value)


def test_spec_file_with_base_path_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "tune").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text(yaml.safe_dump(BASE["base"]))
    d = spec(base="configs/run.yaml", overrides={"epochs": 5})
    (tmp_path / "tune" / "s.yaml").write_text(yaml.safe_dump(d))
    s = load_spec(tmp_path / "tune" / "s.yaml", ["num_trials=7"])
    assert s.base["epochs"] == 5 and s.num_trials == 7
    d["base"] = "configs/missing.yaml"
    (tmp_path / "tune" / "s.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(ValueError, match=r"base='configs/missing.yaml'"):
        load_spec(tmp_path / "tune" / "s.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "tune" / "nope.yaml")


# -- the CLI: bad input is exit 2 and one line, before Ray starts -----------------------------
@pytest.mark.parametrize(("text", "argv", "start"), [
    ("name: s\nspace: !!python/object/apply:os.system [echo pwned]\n", [],
     "invalid YAML: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("name: s\nspace: {optimizer.rho: {loguniform: [0.01, 0.5]}\n", [],
     "invalid YAML: while parsing a flow mapping"),
    ("name: s\nname: t\n", [], "invalid YAML: duplicate key 'name' (first at line 1)"),
    (None, ["--num-cpus", "0"], "--num-cpus=0 is invalid; must be an integer in [1, inf)"),
    (None, ["search.seed=99999999999999999999"], "search.seed=99999999999999999999 is invalid; must be an "
                                              "integer in [0, 4294967295]"),
    (None, ["--storage-path", "s.yaml/results"], "--storage-path="),
    (None, ["name=../x"], "name='../x' is invalid"),
    (None, ["ray.num_cpus=0"], "ray.num_cpus=0 is invalid; must be an integer in [1, inf)"),
    (None, ["--address", "127.0.0.1:1"], "--address='127.0.0.1:1': no Ray cluster answers there (Connection refused"),
    (None, ["--address", "nohostport"], "--address='nohostport' is invalid; must be host:port"),
])
def test_cli_bad_sweep_input_exits_2_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str], text: str | None,
                                                   argv: list[str], start: str) -> None:
    import time

    from zosam.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = tmp_path / "s.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(spec()))
    t0 = time.perf_counter()
    code = main(["sweep", str(path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert start in err, err
    assert time.perf_counter() - t0 < 60  # Ray retried an unreachable address for minutes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]  # no store, no results folder


# -- resources the cluster cannot satisfy -----------------------------------------------------
@pytest.mark.parametrize(("resources", "cluster", "key"), [
    ({"cpus_per_trial": 3}, {"CPU": 2.0}, "resources.cpus_per_trial"),
    ({"cpus_per_trial": 1, "workers_per_trial": 2, "cpus_per_worker": 1}, {"CPU": 2.0}, "cpus_per_worker"),
    ({"workers_per_trial": 1, "gpus_per_worker": 1}, {"CPU": 8.0}, "resources.gpus_per_worker"),
])
def test_resources_the_cluster_cannot_satisfy(resources: dict[str, Any], cluster: dict[str, float],
                                               key: str) -> None:
    s = load_spec(spec(resources=resources))
    with pytest.raises(ValueError) as e:
        check_cluster_can_run(s, cluster)
    assert key in str(e.value) and "Ray cluster has" in str(e.value)


def test_resources_that_fit_pass() -> None:
    s = load_spec(spec(resources={"cpus_per_trial": 1, "workers_per_trial": 2, "cpus_per_worker": 1}))
    assert trial_resources(s) == {"CPU": 3.0, "GPU": 0.0}
    check_cluster_can_run(s, {"CPU": 3.0})
    check_cluster_can_run(s, {"CPU": 4.0, "GPU": 1.0})


# -- Pareto fronts -------------------------------------------------------------------------------
@pytest.mark.parametrize(("points", "modes", "front"), [
    # (acc max, cost min): (0.9, 10) and (0.8, 5) trade off; (0.7, 10) is dominated by both.
    ([(0.9, 10), (0.8, 5), (0.7, 10)], ("max", "min"), [0, 1]),
    # Ties: identical points do not dominate each other, both stay.
    ([(0.9, 10), (0.9, 10), (0.8, 20)], ("max", "min"), [0, 1]),
    # Equal on one objective, better on the other: dominated.
    ([(0.9, 10), (0.9, 12)], ("max", "min"), [0]),
    ([(1.0, 1.0), (2.0, 0.5), (0.5, 3.0)], ("min", "min"), [0, 1, 2]),
    ([(1.0, 1.0), (2.0, 2.0)], ("max", "max"), [1]),
    ([(1.0, 1.0), (2.0, 2.0)], ("min", "min"), [0]),
    # Non-finite points are never on the front and do not dominate.
    ([(math.nan, 1.0), (0.5, 3.0), (math.inf, 0.0)], ("max", "min"), [1]),
    ([(0.5, -math.inf), (0.4, 1.0)], ("max", "min"), [1]),
    ([(0.3,), (0.7,), (0.7,)], ("max",), [1, 2]),
    ([], ("max", "min"), []),
])
def test_pareto_front(points, modes, front) -> None:
    assert pareto_front(points, modes) == front


def test_pareto_front_is_non_dominated_and_complete() -> None:
    """On a grid of points every point off the front is dominated by one on it."""
    pts = [(a / 10, (a * 7 + b * 3) % 11) for a in range(10) for b in range(4)]
    front = pareto_front(pts, ("max", "min"))

    def dom(p, q) -> bool:
        return p[0] >= q[0] and p[1] <= q[1] and (p[0] > q[0] or p[1] < q[1])

    assert front
    for i in front:
        assert not any(dom(pts[j], pts[i]) for j in range(len(pts)))
    for i in set(range(len(pts))) - set(front):
        assert any(dom(pts[j], pts[i]) for j in front)


# -- object storage: an S3 endpoint other than AWS ------------------------------------------------
@pytest.mark.parametrize("bad", ["127.0.0.1:9000", "ftp://host:21", "http://", "http://host:99999",
                                 "http://host:9000/bucket", "http://user:pw@host:9000", 9000])
def test_a_bad_storage_endpoint_is_named(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"storage_endpoint=.* is invalid; must be an S3 endpoint URL"):
        load_spec({**spec(), "storage_path": "s3://b/p", "storage_endpoint": bad})


def test_storage_endpoint_sources_and_the_path_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    from zosam.storage import filesystem, ray_path, resolve_endpoint

    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_endpoint("s3://b/p", None) is None and filesystem("s3://b/p", None) is None
    assert resolve_endpoint("s3://b/p", "http://127.0.0.1:9000/") == "http://127.0.0.1:9000"
    with pytest.raises(ValueError, match=r"--storage-endpoint='http://h:1' needs an s3:// storage_path"):
        resolve_endpoint("gs://b/p", "http://h:1", "--storage-endpoint")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example:8443")
    assert resolve_endpoint("s3://b/p", None) == "https://s3.example:8443"  # the S3-specific variable wins
    assert resolve_endpoint("/local/path", None) is None  # the variables only concern s3:// paths
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "s3.example")
    with pytest.raises(ValueError, match=r"AWS_ENDPOINT_URL_S3='s3\.example' is invalid"):
        resolve_endpoint("s3://b/p", None)
    fs = filesystem("s3://b/p", "http://127.0.0.1:9000")
    assert type(fs).__name__ == "S3FileSystem" and ray_path("s3://b/p", "http://127.0.0.1:9000") == "b/p"


# -- the Optuna study's storage and the registered model's name ---------------------------------
@pytest.mark.parametrize("bad", ["optuna.db", "sqlite://relative.db", "sqlite:///:memory:", "redis://host:6379",
                                 "postgresql://host:5432/optuna with space", 3, ""])
def test_a_bad_study_storage_is_named(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"^search\.storage="):
        load_spec(spec(search={"sampler": "tpe", "seed": 0, "storage": bad}))


def test_study_storage_default_env_and_the_checks_before_ray(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Default: ``optuna.db`` beside the sweep's outputs; ``$ZOSAM_OPTUNA_STORAGE`` next; the
    spec's ``search.storage`` first. A server that does not answer is named with the field."""
    import socket

    from zosam.sweep import study

    monkeypatch.delenv(study.STORAGE_ENV, raising=False)
    assert study.resolve_storage(None, tmp_path) == (f"sqlite:///{tmp_path / 'optuna.db'}", "--storage-path")
    monkeypatch.setenv(study.STORAGE_ENV, "sqlite:////x/y.db")
    assert study.resolve_storage(None, tmp_path) == ("sqlite:////x/y.db", study.STORAGE_ENV)
    assert study.resolve_storage("mysql://h/db", tmp_path) == ("mysql://h/db", "search.storage")
    monkeypatch.setenv(study.STORAGE_ENV, "optuna.db")
    with pytest.raises(ConfigError, match=r"^ZOSAM_OPTUNA_STORAGE="):
        study.resolve_storage(None, tmp_path)
    with socket.socket() as s:  # a free port: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=r"^search\.storage=.*no database answers"):
        study.check_storage("search.storage", f"postgresql://u:secret@127.0.0.1:{port}/optuna", timeout_s=1)
    with pytest.raises(ConfigError, match="is a folder"):
        study.check_storage("search.storage", f"sqlite:///{tmp_path}")
    assert study.display_url("postgresql://u:secret@h:5432/optuna") == "postgresql://u:***@h:5432/optuna"
    assert not study.study_exists(f"sqlite:///{tmp_path / 'none.db'}", "x") and not (tmp_path / "none.db").exists()


def test_registered_model_name_derived_and_validated() -> None:
    s = load_spec(spec(tracking={"experiment": "my sweeps/2026"}))
    assert s.tracking["registered_model"] == "my-sweeps-2026.spec-test"
    assert load_spec(spec(tracking={"registered_model": "zosam-best"})).tracking["registered_model"] == "zosam-best"
    with pytest.raises(ConfigError, match=r"^tracking\.registered_model="):
        load_spec(spec(tracking={"registered_model": "a/b"}))


def test_sweep_does_not_import_bench() -> None:
    """``zosam.sweep`` sits below ``zosam.bench`` (bench may run sweeps, not the reverse)."""
    import ast

    for path in (ROOT / "zosam" / "sweep").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "zosam.bench" or n.startswith(("zosam.bench.", "zosam.compare", "zosam.cli"))
                           for n in names), f"{path.name} imports {names}"
