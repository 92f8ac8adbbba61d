"""More than one Ray node, a tracking server and S3 storage, all on 127.0.0.1.

One module-scoped stack (``zosam.bench.loopback_cluster``): a CPU-less Ray head and two
1-CPU worker nodes from Ray's own multi-node harness (``ray.cluster_utils.Cluster``, each
node its own raylet and processes), an ``mlflow server`` (sqlite backend store) whose
artifacts go to an S3-protocol server (``moto_server``), and every sweep's
``storage_path`` on ``s3://`` of that server. Tests run in file order; the node-loss
test removes a worker node and so runs last. Everything is stopped by process id (Ray's
node handles kill their own processes); ``ray stop`` is never used.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from databases import postgres_database
from proc_utils import descendants, kill_tree
from test_ray_integration import assert_same_weights, final_weights, run_dict, single_process

pytestmark = pytest.mark.cluster

EXPERIMENT = "zosam-multinode"
TRIAL_ACTOR = "ImplicitFunc"  # Tune's actor class of a function trainable


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import ray

    from zosam.bench.loopback_cluster import loopback_cluster

    tmp = tmp_path_factory.mktemp("stack")
    # The MLflow server keeps its runs in PostgreSQL, as a cluster's does (cluster/kuberay/mlflow.yaml).
    with postgres_database() as db, loopback_cluster(num_workers=2, cpus_per_worker=1, tmp=tmp,
                                                      backend_store_uri=db) as lc:
        ray.init(address=lc.address, log_to_driver=False)
        yield lc
        pids = lc.pids() | {p for pid in lc.pids() for p in descendants(pid)}
    alive = [p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in _proc_state(p)]
    assert not alive, f"processes of the stack left behind: {alive}"


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def _spec(name: str, lc, *, trials: int = 2, epochs: int = 2, **resources: Any) -> dict[str, Any]:
    base = run_dict(name, epochs=epochs, tracking={"enabled": True, "experiment": EXPERIMENT})
    return {"name": name, "base": base, "space": {"optimizer.rho": {"loguniform": [0.01, 0.2]}},
            "objectives": [{"metric": "test_acc", "mode": "max"}], "search": {"sampler": "random", "seed": 0},
            "scheduler": {"type": "none"}, "num_trials": trials,
            "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2, **resources},
            "tracking": {"experiment": EXPERIMENT}, "storage_path": lc.storage_path,
            "storage_endpoint": lc.s3_endpoint}


def _children(uri: str, parent_run_id: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[EXPERIMENT],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


def _actors(lc, class_name: str = TRIAL_ACTOR) -> list[Any]:
    """Every actor of a class, alive or dead, from Ray's state API. The address is explicit:
    without it the API follows /tmp/ray/ray_current_cluster, which any other Ray on the
    machine may have rewritten."""
    from ray.util.state import list_actors

    return list_actors(address=lc.address, filters=[("class_name", "=", class_name)], detail=True, limit=10000)


LOOPBACK = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")  # IPv4, IPv4-mapped IPv6, IPv6 loopback


def _listeners(pids: set[int]) -> list[tuple[str, str]]:
    """(local address, ``ss -tlnp`` line) of every TCP listener owned by one of ``pids``."""
    out = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True, check=True).stdout
    return [(line.split()[3], line) for line in out.splitlines()
            if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids]


def _stack_pids(lc) -> set[int]:
    pids = lc.pids() | {os.getpid()}
    return pids | {p for pid in pids for p in descendants(pid)}


def _steps(uri: str, run_id: str, key: str = "train_loss") -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_sweep_spreads_over_nodes_with_server_tracking_and_s3_storage(
        stack, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two concurrent 1-CPU trials on two 1-CPU worker nodes: Ray's state API places them on
    different nodes; each is a child run on the server with params, metrics and artifacts in S3;
    the Optuna study lives in PostgreSQL, as on a cluster."""
    import mlflow
    import optuna
    import ray

    monkeypatch.setenv("ZOSAM_OPTUNA_STORAGE", postgres_url)
    monkeypatch.chdir(tmp_path)  # the driver's local bookkeeping (best config) goes here

    from zosam.sweep import run_sweep
    from zosam.sweep.study import open_storage

    lc = stack
    done = threading.Event()
    seen: dict[str, str] = {}

    def watch() -> None:  # every listener of the stack, sampled while trials run
        while not done.wait(1.0):
            seen.update(_listeners(_stack_pids(lc)))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    try:
        result = run_sweep(_spec("spread", lc), tracking_uri=lc.tracking_uri, out=lambda s: None)
    finally:
        done.set()
        watcher.join()
    print(f"\nspread sweep: {time.perf_counter() - t0:.1f} s")
    print(f"listeners of the stack seen while the sweep ran: {len(seen)}, on "
          f"{sorted({a.rsplit(':', 1)[0] for a in seen})}")
    assert len(seen) > 10  # the servers, GCS, three raylets, dashboards, workers
    bad = [line for addr, line in seen.items() if not addr.startswith(LOOPBACK)]
    assert not bad, bad
    assert result.completed and [t["status"] for t in result.trials] == ["finished", "finished"]
    workers = {n.node_id for n in lc.workers}
    # Where each trial ran, as it recorded it (Ray's state API can lag a fast sweep by more
    # than a minute; the node-loss test asks it while trials run).
    placed = set(_children(lc.tracking_uri, result.parent_run_id)["tags.zosam.ray_node_id"])
    assert placed <= workers and len(placed) == 2, (placed, workers)  # the head has no CPUs
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}

    kids = _children(lc.tracking_uri, result.parent_run_id)
    assert len(kids) == 2 and set(kids["status"]) == {"FINISHED"}
    assert kids["params.optimizer.rho"].notna().all()
    client = mlflow.MlflowClient(lc.tracking_uri)
    for run_id in kids["run_id"]:
        assert _steps(lc.tracking_uri, run_id) == [1, 2]
        names = {a.path for a in client.list_artifacts(run_id)}
        assert {"config.yaml", "history.yaml"} <= names
        keys = lc.keys("zosam-mlflow")
        assert any(k.endswith(f"{run_id}/artifacts/config.yaml") for k in keys)  # in the S3 bucket itself
        local = client.download_artifacts(run_id, "config.yaml", str(lc.tmp))
        assert yaml.safe_load(Path(local).read_text())["optimizer"]["name"] == "zosam"
    ray_keys = lc.keys("zosam-ray", "ray/spread/")
    assert any("experiment_state" in k for k in ray_keys)
    assert len({k.split("/")[2] for k in ray_keys if "/checkpoint_" in k}) == 2  # both trials checkpointed to S3
    assert [t["retries"] for t in result.trials] == [0, 0]
    # The server's runs are rows in PostgreSQL (not a sqlite file on the server's disk).
    import psycopg

    with psycopg.connect(lc.backend_store_uri) as db:
        stored = {r[0] for r in db.execute("SELECT run_uuid FROM runs").fetchall()}
    assert set(kids["run_id"]) <= stored
    with open_storage(postgres_url) as storage:
        study = optuna.load_study(study_name="spread", storage=storage)
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
        assert sorted(t.value for t in study.trials) == pytest.approx(sorted(t["test_acc"] for t in result.trials))


def test_two_train_workers_on_two_nodes_equal_one_process(stack, tmp_path: Path) -> None:
    """DDP over gloo between two nodes (one 1-CPU worker on each), checkpoint on S3, equals one
    process with the whole batch (float64, as tests/test_ray_integration.py's 2-worker test)."""
    from zosam.ray_train import make_trainer
    from zosam.storage import filesystem, ray_path

    lc = stack
    storage = f"{lc.storage_path}/ddp"
    cfg = run_dict("ddp2", dtype="float64", data__batch_size=16, sparse__method="random",
                   checkpoint={"keep": 1})
    result = make_trainer(cfg, num_workers=2, use_gpu=False, name="ddp2",
                          storage_path=ray_path(storage, lc.s3_endpoint),
                          storage_filesystem=filesystem(storage, lc.s3_endpoint)).fit()
    assert result.error is None
    assert result.checkpoint.path.startswith("zosam-ray/ray/ddp/ddp2/")  # on S3, read back below
    kept = {k.split("/")[3] for k in lc.keys("zosam-ray", "ray/ddp/ddp2/checkpoint_") if k.count("/") >= 4}
    assert len(kept) == 1, kept  # checkpoint.keep=1 of the run config: Ray deleted the first epoch's
    with result.checkpoint.as_directory() as d:
        ddp = final_weights(d)
    workers = _actors(lc, "RayTrainWorker")
    assert len(workers) == 2 and len({a.node_id for a in workers}) == 2, [(a.node_id, a.state) for a in workers]
    single = single_process(run_dict("ddp2-single", dtype="float64", data__batch_size=32, sparse__method="random"),
                            tmp_path / "single")
    assert ddp["1.weight"].dtype == torch.float64
    assert_same_weights(ddp, final_weights(tmp_path / "single"), rtol=1e-9, atol=1e-9)
    assert result.metrics["steps"] == single.summary["steps"] == 16


def test_multi_node_check_refuses_local_stores(stack, tmp_path: Path) -> None:
    """On the 3-node cluster a sqlite tracking store or a local storage path is refused before
    any trial starts (the server + S3 case is the sweep above)."""
    from zosam.sweep import run_sweep

    lc = stack
    before = len(_actors(lc))
    with pytest.raises(ValueError, match=r"MLFLOW_TRACKING_URI='sqlite:.*3-node cluster"):
        run_sweep(_spec("local-uri", lc), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", out=lambda s: None)
    spec = _spec("local-path", lc)
    del spec["storage_endpoint"]
    with pytest.raises(ValueError, match=r"ZOSAM_STORAGE_PATH=.*3-node cluster"):
        run_sweep(spec, tracking_uri=lc.tracking_uri, storage_path=str(tmp_path / "ray"), out=lambda s: None)
    assert len(_actors(lc)) == before


def _sweep_cli(spec: Path, lc, cwd: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "zosam.cli", "sweep", str(spec), "--address", lc.address,
           "--tracking-uri", lc.tracking_uri, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_driver_killed_then_resumed_on_the_same_cluster(stack, tmp_path: Path) -> None:
    """SIGKILL a ``zosam sweep --address`` driver once a trial has checkpointed to S3, then
    ``--resume`` against the same cluster and stores: every trial finishes, one child each."""
    import mlflow

    lc = stack
    spec = _spec("driver-loss", lc, trials=2, epochs=4)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = _sweep_cli(path, lc, tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            keys = lc.keys("zosam-ray", "ray/driver-loss/")
            if any("experiment_state" in k for k in keys) and any("/checkpoint_" in k for k in keys):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the sweep ended before its driver could be killed:\n" + "".join(lines[-40:])
        assert time.monotonic() < deadline, "no checkpoint in time:\n" + "".join(lines[-40:])
    finally:
        kill_tree(proc, sig=signal.SIGKILL)
    t0 = time.perf_counter()
    proc = _sweep_cli(path, lc, tmp_path, "--resume")
    try:
        out, _ = proc.communicate(timeout=420)
    finally:
        kill_tree(proc)
    print(f"\nresumed sweep: {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, out[-4000:]
    assert "resuming sweep 'driver-loss'" in out
    mlflow.set_tracking_uri(lc.tracking_uri)
    parents = mlflow.search_runs(experiment_names=[EXPERIMENT],
                                 filter_string="tags.`zosam.sweep` = 'driver-loss' and tags.`zosam.role` = 'sweep'")
    assert len(parents) == 1
    kids = _children(lc.tracking_uri, parents["run_id"][0])
    assert len(kids) == 2 and kids["tags.zosam.trial_id"].nunique() == 2, kids[["tags.zosam.trial_id", "status"]]
    assert set(kids["status"]) == {"FINISHED"} and set(kids["tags.zosam.status"]) == {"finished"}
    for run_id in kids["run_id"]:
        assert _steps(lc.tracking_uri, run_id) == [1, 2, 3, 4]


def test_node_lost_mid_sweep_trials_restore_on_a_surviving_node(
        stack, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove worker node 1 while both trials run and have checkpointed to S3. Its trial fails,
    is retried (``max_failures: 1``) on the surviving node from its S3 checkpoint, and
    continues its MLflow run: one child per trial, every epoch's step logged exactly once."""
    from zosam.sweep import run_sweep

    monkeypatch.setenv("ZOSAM_OPTUNA_STORAGE", postgres_url)
    monkeypatch.chdir(tmp_path)
    lc = stack
    # Long enough (about 0.3 s an epoch on a quiet machine) that the loss lands mid-run.
    epochs = 40
    spec = _spec("node-loss", lc, trials=2, epochs=epochs, max_failures=1)
    spec["base"]["checkpoint"] = {"keep": 3}
    box: dict[str, Any] = {}
    lines: list[str] = []
    run = threading.Thread(target=lambda: box.setdefault("r", run_sweep(
        spec, tracking_uri=lc.tracking_uri, out=lines.append)), daemon=True)
    t0 = time.perf_counter()
    run.start()
    deadline = time.monotonic() + 300
    # Both trials have uploaded two checkpoints (S3 is fast to ask; the state API is not, so
    # it is asked once, below): the driver has then registered the first, so the lost trial
    # restores from a checkpoint, not from scratch.
    while time.monotonic() < deadline and run.is_alive():
        kept: dict[str, set[str]] = {}
        for k in lc.keys("zosam-ray", "ray/node-loss/"):
            if "/checkpoint_" in k and k.count("/") >= 4:
                kept.setdefault(k.split("/")[2], set()).add(k.split("/")[3])
        if len(kept) == 2 and all(len(v) >= 2 for v in kept.values()):
            break
        time.sleep(0.1)
    # The node to lose runs a trial now (the state API can lag: asked until it says so). On a
    # loaded machine one trial may start late or end early: whichever worker runs one is lost.
    busy: set[str] = set()
    while not busy and run.is_alive() and time.monotonic() < deadline:
        before = _actors(lc)
        busy = {a.node_id for a in before if a.state == "ALIVE"}
        time.sleep(0 if busy else 0.3)
    assert run.is_alive() and busy, "no trial to lose:\n" + "\n".join(lines)
    lost = next(n for n in reversed(lc.workers) if n.node_id in busy)
    stack.cluster.remove_node(lost)
    stack.workers.remove(lost)
    run.join(timeout=420)
    assert not run.is_alive(), "the sweep did not finish after the node loss"
    print(f"\nnode-loss sweep: {time.perf_counter() - t0:.1f} s")
    result = box["r"]
    assert result.completed and [t["status"] for t in result.trials] == ["finished", "finished"]
    assert sorted(t["retries"] for t in result.trials) == [0, 1]
    assert any("1/1" in ln for ln in lines)  # the leaderboard shows the retry budget used
    restored = next(t for t in result.trials if t["retries"] == 1)

    actors = _actors(lc)
    assert any(a.node_id == lost.node_id for a in actors)
    after = [a for a in actors if a.actor_id not in {b.actor_id for b in before}]
    assert after, "no trial restarted after the loss"
    assert all(a.node_id == lc.workers[0].node_id for a in after), [(a.node_id, a.state) for a in after]
    # The retried trial restored from a checkpoint in S3: Tune counts iterations since the restore.
    key = next(k for k in lc.keys("zosam-ray", "ray/node-loss/") if restored["trial_id"] in k
               and k.endswith("result.json"))
    last = json.loads(lc.s3().get_object(Bucket="zosam-ray", Key=key)["Body"].read().decode().splitlines()[-1])
    assert last["training_iteration"] == epochs and 0 < last["iterations_since_restore"] < epochs, last

    kept: dict[str, set[str]] = {}
    for k in lc.keys("zosam-ray", "ray/node-loss/"):
        if "/checkpoint_" in k and k.count("/") >= 4:
            kept.setdefault(k.split("/")[2], set()).add(k.split("/")[3])
    assert len(kept) == 2 and all(1 <= len(v) <= 3 for v in kept.values()), kept  # checkpoint.keep=3 of 40

    kids = _children(lc.tracking_uri, result.parent_run_id)
    assert len(kids) == 2 and kids["tags.zosam.trial_id"].nunique() == 2
    assert set(kids["status"]) == {"FINISHED"}
    for run_id in kids["run_id"]:
        assert _steps(lc.tracking_uri, run_id) == list(range(1, epochs + 1))
