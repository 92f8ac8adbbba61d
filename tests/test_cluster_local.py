"""A real Ray cluster on this machine: ``ray start --head``, then the two ways cluster/README.md
gives to run a sweep on it: ``zosam sweep --address`` from a driver, and ``ray job submit``.

The head runs with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (every listener on 127.0.0.1).
Ray refuses a second node in that mode, so this is a one-node cluster; a true two-node
test would need network namespaces of the test's own (not built: see the issue note).
Everything is stopped by the process ids this test started, never with ``ray stop``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from proc_utils import free_port, kill_tree

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The runtime env of cluster/README.md's `ray job submit` lines.
EXCLUDES = '{"excludes": [".git", ".venv", "mlflow.db", "runs", "outputs"]}'


def _spec(name: str) -> dict:
    return {
        "name": name,
        "base": {"seed": 0, "epochs": 1, "max_steps_per_epoch": 3,
                 "data": {"name": "digits", "image_size": 8, "batch_size": 32, "eval_batch_size": 512},
                 "model": {"name": "mlp", "in_features": 192, "hidden": [16, 16]},
                 "optimizer": {"name": "zosam", "lr": 0.1, "rho": 0.05, "mu": 1e-3, "q": 1},
                 "sparse": {"method": "set", "density": 0.5, "update_interval": 2}},
        "space": {"optimizer.rho": {"loguniform": [0.01, 0.1]}},
        "scheduler": {"type": "none"},
        "num_trials": 2,
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2},
        "tracking": {"experiment": "cluster-test"},
    }


def _children(uri: str, sweep: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    parent = mlflow.search_runs(experiment_names=["cluster-test"],
                                filter_string=f"tags.`zosam.sweep` = '{sweep}' and tags.`zosam.role` = 'sweep'")
    assert len(parent) == 1
    return mlflow.search_runs(experiment_names=["cluster-test"],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent['run_id'][0]}'")


def _wait_for_head(env: dict, gcs: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited"
        if subprocess.run([str(BIN / "ray"), "status", "--address", gcs], env=env, capture_output=True,
                          timeout=60).returncode == 0:
            return
        time.sleep(2)
    raise AssertionError("the Ray head did not come up in time")


def test_ray_head_runs_a_driver_sweep_and_a_submitted_job(tmp_path: Path) -> None:
    # Token authentication, as on a real cluster: the head and every client (ray status,
    # the zosam driver, ray job submit) use the token in ~/.ray/auth_token.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "PYTHONUNBUFFERED": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # `ray start` with token auth needs a token; the README's way to make one (a no-op when
    # ~/.ray/auth_token exists, as after any earlier local Ray).
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                   timeout=120)
    # `ray start` records its address in /tmp/ray/ray_current_cluster; put back what was there.
    from ray._private.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(None))
    previous = address_file.read_text() if address_file.is_file() else None
    port, dashboard = free_port(), free_port()
    gcs = f"127.0.0.1:{port}"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--num-cpus", "4", "--block"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        _wait_for_head(env, gcs, head)
        # 1. A driver on this machine connects to the head by address.
        spec = tmp_path / "driver.yaml"
        spec.write_text(yaml.safe_dump(_spec("on-head")))
        sweep = subprocess.run(
            [str(BIN / "zosam"), "sweep", str(spec), "--address", gcs, "--storage-path", str(tmp_path / "ray"),
             "--tracking-uri", uri], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
        assert "sweep 'on-head': 2 trials (2 finished" in sweep.stdout
        runs = _children(uri, "on-head")
        assert len(runs) == 2 and set(runs["tags.zosam.status"]) == {"finished"}

        # 2. The README's job submission: working dir = the project, entrypoint = zosam sweep
        # ... --address auto (the job runs on the cluster and finds it by itself).
        spec = tmp_path / "job.yaml"
        spec.write_text(yaml.safe_dump(_spec("as-job")))
        entry = (f"zosam sweep {shlex.quote(str(spec))} --address auto --storage-path "
                 f"{shlex.quote(str(tmp_path / 'ray'))} --tracking-uri {shlex.quote(uri)}")
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".",
             "--runtime-env-json", EXCLUDES, "--", *shlex.split(entry)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout.lower(), job.stdout[-3000:]
        runs = _children(uri, "as-job")
        assert len(runs) == 2 and set(runs["status"]) == {"FINISHED"}
        assert json.loads((tmp_path / "ray" / "as-job.zosam.json").read_text())["tracking_uri"] == uri
    finally:
        kill_tree(head)
        if previous is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(previous)
