"""A multi-node Ray cluster with a tracking server and S3 storage, all on 127.0.0.1.

What the cluster tests (``tests/test_cluster_multinode.py``) and the scheduling benchmark
(``zosam bench cluster-overhead``) run on:

- an S3-protocol server (``moto_server``, from the dev extra) holding two buckets, one for
  MLflow's artifacts and one for Ray's ``storage_path``;
- an ``mlflow server`` (one worker, a sqlite backend store in a temporary folder) that
  proxies artifacts to that S3 server;
- Ray's own multi-node harness, ``ray.cluster_utils.Cluster``: a head with no CPUs (the
  drivers' side) and worker nodes, every one a separate raylet with its own processes,
  all with ``node_ip_address=127.0.0.1`` and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``.

Every process is started here and stopped by its process id (or Ray's own node handles,
which kill by pid); ``ray stop`` is never used. The environment that trials need (the S3
credentials and endpoint) is set in this process before the nodes start, so every raylet
and worker inherits it, and restored on exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RAY_BUCKET, MLFLOW_BUCKET = "zosam-ray", "zosam-mlflow"
BIN = Path(sys.executable).parent


def ray_address_file() -> Path:
    """Where ``ray start`` and ``ray.init`` record the latest local cluster's address
    (``<tmp>/ray/ray_current_cluster``, the file ``ray.init(address="auto")`` reads).

    Ray has no public function for this path, so Ray's documented rule is written out here
    (``$RAY_TMPDIR``, else ``$TMPDIR`` on Linux, else ``/tmp``; then ``ray/``);
    tests/test_packaging.py::test_ray_address_file_matches_ray compares it with Ray's own.
    """
    if "RAY_TMPDIR" in os.environ:
        base = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        base = os.environ["TMPDIR"]
    elif sys.platform.startswith(("linux", "darwin")):
        base = "/tmp"
    else:
        base = tempfile.gettempdir()
    return Path(base) / "ray" / "ray_current_cluster"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, ok, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        with contextlib.suppress(OSError):
            if ok():
                return
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f} s")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status == 200


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group started with ``start_new_session=True``, SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            return


@dataclass
class LoopbackCluster:
    """Handles of a running stack (see the module docstring); use :func:`loopback_cluster`."""

    cluster: Any
    workers: list[Any]
    s3_endpoint: str
    tracking_uri: str
    storage_path: str
    tmp: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    backend_store_uri: str = ""  # the MLflow server's database

    @property
    def address(self) -> str:
        return self.cluster.address

    def s3(self):
        """A boto3 client of the S3 server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in ``bucket``."""
        out, token = [], None
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self.s3().list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def pids(self) -> set[int]:
        """Process ids of every process of the stack that is alive now (servers and Ray nodes)."""
        pids = {p.pid for p in self.procs.values() if p.poll() is None}
        for node in self.cluster.list_all_nodes():
            for infos in node.all_processes.values():
                pids |= {i.process.pid for i in infos if i.process.poll() is None}
        return pids


ENV = {"AWS_ACCESS_KEY_ID": "zosam-test", "AWS_SECRET_ACCESS_KEY": "zosam-test", "AWS_DEFAULT_REGION": "us-east-1",
       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@contextlib.contextmanager
def loopback_cluster(num_workers: int = 2, cpus_per_worker: float = 1, tmp: str | Path | None = None,
                     worker_resources: bool = True, head_cpus: float = 0, backend_store_uri: str | None = None):
    """Start the stack; yield a :class:`LoopbackCluster`; stop everything it started.

    Args:
        num_workers: worker nodes besides the head.
        cpus_per_worker: logical CPUs of each worker node.
        head_cpus: logical CPUs of the head (0: it only hosts drivers and Ray's services).
        tmp: folder for the sqlite store and logs (default: a new temporary folder).
        worker_resources: give worker node i a custom resource ``node<i>: 1`` (to pin work).
        backend_store_uri: the MLflow server's database, e.g. a PostgreSQL URL, as on a
            cluster (default: a sqlite file in ``tmp``).
    """
    own_tmp = tempfile.TemporaryDirectory(prefix="zosam-cluster-") if tmp is None else None
    root = Path(tmp or own_tmp.name)
    s3_port, mlflow_port = free_port(), free_port()
    backend_store_uri = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
    endpoint = f"http://127.0.0.1:{s3_port}"
    saved = {k: os.environ.get(k) for k in (*ENV, "MLFLOW_S3_ENDPOINT_URL")}
    # Before Ray is imported: Ray reads the loopback switch when it loads.
    os.environ.update({**ENV, "MLFLOW_S3_ENDPOINT_URL": endpoint})
    import ray
    from ray.cluster_utils import Cluster

    address_file = ray_address_file()
    previous_address = address_file.read_text() if address_file.is_file() else None
    procs: dict[str, subprocess.Popen] = {}
    cluster = None
    try:
        procs["moto_server"] = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], stdout=subprocess.DEVNULL,
            stderr=(root / "moto.log").open("w"), start_new_session=True)
        _wait("moto_server", lambda: _http_ok(endpoint + "/moto-api/"), procs["moto_server"], 60)
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for bucket in (RAY_BUCKET, MLFLOW_BUCKET):
            s3.create_bucket(Bucket=bucket)
        procs["mlflow_server"] = subprocess.Popen(
            [str(BIN / "mlflow"), "server",
             "--backend-store-uri", backend_store_uri,
             "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts", "--host", "127.0.0.1",
             "--port", str(mlflow_port), "--workers", "1"],
            stdout=(root / "mlflow.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        tracking_uri = f"http://127.0.0.1:{mlflow_port}"
        _wait("mlflow server", lambda: _http_ok(tracking_uri + "/health"), procs["mlflow_server"], 120)
        # Free ports rather than Ray's fixed defaults (8265, 52365): other Rays may run here.
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "node_ip_address": "127.0.0.1", "num_cpus": head_cpus, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()})
        workers = [cluster.add_node(node_ip_address="127.0.0.1", num_cpus=cpus_per_worker,
                                    resources={f"node{i}": 1} if worker_resources else None)
                   for i in range(num_workers)]
        cluster.wait_for_nodes()
        yield LoopbackCluster(cluster, workers, endpoint, tracking_uri, f"s3://{RAY_BUCKET}/ray", root, procs,
                              backend_store_uri)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()  # every node's processes, by pid
        for proc in reversed(procs.values()):
            _stop(proc)
        if previous_address is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(previous_address)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if own_tmp is not None:
            own_tmp.cleanup()
