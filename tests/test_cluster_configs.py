"""Offline validation of everything under cluster/: launcher configs, manifests, README commands.

No network and no cluster: Ray's own cluster-config validation, kubernetes-validate, the
KubeRay operator's CRD schemas of the pinned release (tests/data/kuberay-crds/), the security
checks (Ray token auth, securityContexts, NetworkPolicies, MLflow auth) and the zosam CLI
parser, on the files as committed. Each validator also gets deliberately broken copies, which
must be rejected naming the field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from zosam.storage import check_multi_node_settings
from zosam_cluster import (
    KUBERAY_VERSION,
    ClusterConfigError,
    check_kuberay_security,
    check_launcher_security,
    check_mlflow_server_command,
    validate_k8s_manifests,
    validate_ray_cluster_config,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAY_CONFIGS = sorted(CLUSTER.glob("*.yaml"))
K8S_MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
README = CLUSTER / "README.md"
KUBERAY_CRDS = ROOT / "tests" / "data" / "kuberay-crds" / f"v{KUBERAY_VERSION}"
REQUIRED_ENV = ("MLFLOW_TRACKING_URI", "ZOSAM_STORAGE_PATH", "ZOSAM_DATA_DIR")


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def _pyproject_pins() -> list[str]:
    """Every ``name==version`` requirement of pyproject.toml (extras kept, quotes off)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if "==" in d]


def _load(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_all_cluster_files_are_covered() -> None:
    """The parametrisations below see every config: two launcher configs, four manifests."""
    assert [p.name for p in RAY_CONFIGS] == ["aws.yaml", "gcp.yaml"]
    assert [p.name for p in K8S_MANIFESTS] == [
        "common.yaml", "mlflow.yaml", "networkpolicy.yaml", "raycluster.yaml", "rayjob.yaml"
    ]


# ----------------------------------------------------------------- Ray cluster launcher


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=_ids(RAY_CONFIGS))
def test_ray_cluster_config_is_valid_and_laid_out(path: Path) -> None:
    config = validate_ray_cluster_config(path)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0
    # 8-GPU nodes for DeiT, 1-GPU nodes for CIFAR; GPU nodes only on demand.
    assert types["gpu_8x"]["resources"]["GPU"] == 8
    assert types["gpu_1x"]["resources"]["GPU"] == 1
    assert types["gpu_8x"]["min_workers"] == 0 == types["gpu_1x"]["min_workers"]
    # The environment file reaches `ray start` on head and workers alike.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert ". ~/zosam.env" in " ".join(config[key]), key
    assert config["file_mounts"]["~/zosam.env"] == "./cluster/zosam.env"


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=_ids(RAY_CONFIGS))
def test_ray_cluster_setup_pins_pyproject_versions(path: Path) -> None:
    """Nodes install what the README installs: every pin of pyproject.toml, then the project."""
    setup = " ".join(_load(path)[0]["setup_commands"])
    for pin in _pyproject_pins():
        assert pin in setup, f"{path.name}: setup_commands lack {pin}"
    assert "pip install -e ~/zosam" in setup


def test_dockerfile_pins_pyproject_versions() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    for pin in _pyproject_pins():
        assert pin in text, f"cluster/Dockerfile lacks {pin}"
    # The MLflow server's image: the client's MLflow, with the auth extra, every package pinned.
    mlflow_pin = next(p for p in _pyproject_pins() if p.startswith("mlflow=="))
    installs = re.findall(r"pip install (.+?)(?:\\\n|$|&&)", (CLUSTER / "mlflow.Dockerfile").read_text())
    packages = [t.strip("'") for line in installs for t in shlex.split(line) if not t.startswith("-")]
    assert f"mlflow[auth]=={mlflow_pin.split('==')[1]}" in packages
    assert packages and all(re.fullmatch(r"[\w.\-\[\]]+==[\w.]+", p) for p in packages), packages


def test_images_run_as_a_numeric_non_root_user() -> None:
    """runAsNonRoot can only be verified by the kubelet for a numeric USER."""
    for name, user in (("Dockerfile", "1000:100"), ("mlflow.Dockerfile", "10001:10001")):
        users = re.findall(r"^USER (\S+)$", (CLUSTER / name).read_text(), flags=re.M)
        assert users[-1] == user, name


def test_dockerignore_keeps_results_and_secrets_out_of_the_image() -> None:
    # A git pattern without a slash matches at any depth: "**/X" in Docker's syntax.
    lines = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    ignored = {line.strip().rstrip("/").removeprefix("**/") for line in lines
               if line.strip() and not line.startswith("#")}
    gitignored = {line.strip().rstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines()
                  if line.strip() and not line.startswith("#")}
    assert gitignored - ignored == set(), "ignored by git but sent to the image build"
    for name in (".venv", "mlflow.db", "mlruns", "runs", "ray_results", "sweep_outputs", "compare", ".cache",
                 "cluster/zosam.env", "cluster/mlflow-auth.ini"):
        assert name in ignored, name
    assert {"zosam.env", "mlflow-auth.ini"} <= set((CLUSTER / ".gitignore").read_text().split())


def test_images_match_the_pinned_ray_version() -> None:
    """Every Ray image is rayproject/ray:<pinned ray>-py311-<platform>; no ray-ml (ended 2.49)."""
    ray_pin = next(p for p in _pyproject_pins() if p.startswith("ray["))
    version = ray_pin.split("==")[1]
    images = []
    for path in [*RAY_CONFIGS, *K8S_MANIFESTS, CLUSTER / "Dockerfile", README]:
        text = path.read_text()
        assert "rayproject/ray-ml:" not in text, path.name
        images += re.findall(r"rayproject/ray:[\w.\-]+", text)
    assert images
    for image in images:
        assert re.fullmatch(rf"rayproject/ray:{re.escape(version)}-py311-(cpu|cu\d+|gpu)", image)
    rayversions = {_load(p)[0]["spec"].get("rayVersion") for p in K8S_MANIFESTS
                   if p.name == "raycluster.yaml"}
    assert rayversions == {version}


def test_environment_variables_are_the_same_everywhere() -> None:
    example = dict(
        line.split("=", 1) for line in (CLUSTER / "zosam.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    configmap = next(d for d in _load(CLUSTER / "kuberay" / "common.yaml")
                     if d["kind"] == "ConfigMap")["data"]
    for name in REQUIRED_ENV:
        assert name in example and name in configmap, name
    # Same variable names on both targets; on Kubernetes the secrets come from Secrets
    # (Ray's token through authOptions, the MLflow user through envFrom of mlflow-client).
    secrets = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    assert secrets <= set(example)
    assert set(example) - secrets == set(configmap)
    assert configmap["MLFLOW_TRACKING_URI"].startswith("http://")
    assert example["RAY_AUTH_MODE"] == "token"
    spec = _load(CLUSTER / "kuberay" / "raycluster.yaml")[0]["spec"]
    for tmpl in [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]:
        env_from = tmpl["spec"]["containers"][0]["envFrom"]
        assert {"configMapRef": {"name": "zosam-env"}} in env_from
        assert {"secretRef": {"name": "mlflow-client"}} in env_from


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda c: c["available_node_types"]["gpu_1x"].update(min_worker=1), "gpu_1x"),
        (lambda c: c["docker"].update(imagee="x"), "imagee"),
        (lambda c: c["available_node_types"]["gpu_8x"]["resources"].update(GPU=-8), "GPU"),
        (lambda c: c.update(head_node_type="nope"), "head_node_type"),
    ],
    ids=["misspelt-key", "unknown-docker-key", "negative-gpus", "missing-head-type"],
)
def test_broken_ray_cluster_config_is_rejected(tmp_path: Path, mutate, field: str) -> None:
    config = _load(CLUSTER / "aws.yaml")[0]
    mutate(config)
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    with pytest.raises(ClusterConfigError, match=re.escape(field)):
        validate_ray_cluster_config(broken)


# ----------------------------------------------------------------- Kubernetes / KubeRay


@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=_ids(K8S_MANIFESTS))
def test_k8s_manifests_are_valid(path: Path) -> None:
    checked = validate_k8s_manifests(path, kuberay_crds=KUBERAY_CRDS)
    expected = {
        "common.yaml": ["ConfigMap/zosam-env", "PersistentVolumeClaim/zosam-data",
                        "ServiceAccount/zosam-ray"],
        "mlflow.yaml": ["Deployment/mlflow", "Service/mlflow"],
        "networkpolicy.yaml": ["NetworkPolicy/zosam-default-deny-ingress", "NetworkPolicy/zosam-ray-cluster",
                               "NetworkPolicy/zosam-ray-head-clients", "NetworkPolicy/zosam-mlflow"],
        "raycluster.yaml": ["RayCluster/zosam"],
        "rayjob.yaml": ["RayJob/zosam-imagenet-deit"],
    }
    assert checked == expected[path.name]


def test_rayjob_runs_the_deit_sweep_on_the_raycluster_spec() -> None:
    cluster = _load(CLUSTER / "kuberay" / "raycluster.yaml")[0]
    job = _load(CLUSTER / "kuberay" / "rayjob.yaml")[0]
    assert job["spec"]["entrypoint"] == "zosam sweep tune/imagenet_deit.yaml --address auto"
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]


def test_gpu_worker_groups_request_gpus() -> None:
    spec = _load(CLUSTER / "kuberay" / "raycluster.yaml")[0]["spec"]
    gpus = {
        g["groupName"]: g["template"]["spec"]["containers"][0]["resources"]["limits"][
            "nvidia.com/gpu"]
        for g in spec["workerGroupSpecs"]
    }
    assert gpus == {"gpu-8x": "8", "gpu-1x": "1"}
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head["limits"]


def test_mlflow_server_uses_database_object_store_and_auth() -> None:
    deployment = _load(CLUSTER / "kuberay" / "mlflow.yaml")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    secret_env = {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                  for e in container["env"] if "valueFrom" in e}
    assert secret_env == {
        "MLFLOW_BACKEND_STORE_URI": ("mlflow-store", "backend-store-uri"),
        "MLFLOW_ARTIFACTS_DESTINATION": ("mlflow-store", "artifacts-destination"),
        "MLFLOW_AUTH_ADMIN_USERNAME": ("mlflow-auth", "admin-username"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ("mlflow-auth", "admin-password"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": ("mlflow-auth", "flask-secret-key"),
    }
    args = container["args"]
    assert args[args.index("--backend-store-uri") + 1] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert args[args.index("--app-name") + 1] == "basic-auth"
    assert "command" not in container  # the image's entrypoint: nothing installed at start
    # The auth config file is the Secret's key, mounted where MLFLOW_AUTH_CONFIG_PATH points.
    config_path = next(e["value"] for e in container["env"] if e["name"] == "MLFLOW_AUTH_CONFIG_PATH")
    mount = next(m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "mlflow-auth"
    assert volume["secret"]["items"] == [{"key": Path(config_path).name, "path": Path(config_path).name}]


def test_mlflow_auth_config_example_is_read_by_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's own parser reads the example: a persistent user store, no password in the file."""
    import importlib.util

    import mlflow.environment_variables

    # MLflow's config reader, loaded by itself: importing it as mlflow.server.auth.config would
    # first import the whole auth app (Flask, every handler), 5-15 s on a 2-core CI machine.
    path = Path(mlflow.environment_variables.__file__).parent / "server" / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("mlflow_auth_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    read_auth_config = module.read_auth_config
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(CLUSTER / "mlflow-auth.ini.example"))
    config = read_auth_config()
    assert config.default_permission == "READ"
    assert config.database_uri.startswith("postgresql://")
    assert config.admin_password is None  # from the Secret / environment, never the file
    assert config.authorization_function == "mlflow.server.auth:authenticate_request_basic_auth"


def _mutate_k8s(path: str, mutate) -> str:
    docs = _load(CLUSTER / "kuberay" / path)
    mutate(docs)
    return yaml.safe_dump_all(docs)


@pytest.mark.parametrize(
    ("path", "mutate", "field"),
    [
        # A typo inside a KubeRay pod template: kubernetes-validate (strict) catches it.
        ("raycluster.yaml",
         lambda d: d[0]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
         .update(imagePullPolicyy="Always"),
         "spec.workerGroupSpecs[0].template.spec.containers[0]"),
        # rayStartParams values must be strings (our KubeRay schema).
        ("raycluster.yaml",
         lambda d: d[0]["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
         "spec.headGroupSpec.rayStartParams.num-cpus"),
        ("rayjob.yaml", lambda d: d[0]["spec"].update(entrypont="x"), "entrypont"),
        ("rayjob.yaml",
         lambda d: d[0]["spec"]["rayClusterSpec"]["workerGroupSpecs"][1].update(minReplicas=9),
         "spec.rayClusterSpec.workerGroupSpecs[1]"),
        ("raycluster.yaml",
         lambda d: d[0]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
             "resources"]["limits"].update({"nvidia.com/gpu": "4"}),
         "nvidia.com/gpu"),
        ("mlflow.yaml", lambda d: d[1]["spec"]["ports"][0].update(port="5000"),
         "spec.ports[0].port"),
        # Fields the KubeRay v1 CRD does not have: the review's deletionPolicy (a RayJob field
        # only up to KubeRay 1.4), misspelt and unknown fields at several depths.
        ("rayjob.yaml", lambda d: d[0]["spec"].update(deletionPolicy="DeleteCluster"), "deletionPolicy"),
        ("raycluster.yaml", lambda d: d[0]["spec"].update(enableInTreeAutoscalling=True),
         "enableInTreeAutoscalling"),
        ("raycluster.yaml", lambda d: d[0]["spec"]["authOptions"].update(secretNmae="x"), "secretNmae"),
        ("rayjob.yaml", lambda d: d[0]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplica=4),
         "maxReplica"),
        ("rayjob.yaml",
         lambda d: d[0]["spec"]["submitterPodTemplate"]["spec"]["containers"][0].update(imagee="x"),
         "spec.submitterPodTemplate.spec.containers[0]"),
        # Types and enums of the CRD.
        ("raycluster.yaml", lambda d: d[0]["spec"]["authOptions"].update(mode="on"), "spec.authOptions.mode"),
        ("raycluster.yaml", lambda d: d[0]["spec"]["workerGroupSpecs"][1].update(maxReplicas="8"),
         "spec.workerGroupSpecs[1].maxReplicas"),
        ("raycluster.yaml", lambda d: d[0].update(apiVersion="ray.io/v2"), "apiVersion"),
    ],
    ids=["pod-template-typo", "raystartparams-int", "rayjob-typo", "replicas-order",
         "gpu-request-ne-limit", "service-port-type", "rayjob-deletionPolicy", "raycluster-typo",
         "authoptions-typo", "workergroup-typo", "submitter-typo", "auth-mode-enum", "replicas-type",
         "api-version"],
)
def test_broken_k8s_manifest_is_rejected(tmp_path: Path, path: str, mutate, field: str) -> None:
    broken = tmp_path / path
    broken.write_text(_mutate_k8s(path, mutate))
    with pytest.raises(ClusterConfigError, match=re.escape(field)):
        validate_k8s_manifests(broken, kuberay_crds=KUBERAY_CRDS)


def test_kuberay_needs_the_crds(tmp_path: Path) -> None:
    with pytest.raises(ClusterConfigError, match="kuberay_crds="):
        validate_k8s_manifests(CLUSTER / "kuberay" / "raycluster.yaml")
    (tmp_path / "ray.io_rayclusters.yaml").write_text(yaml.safe_dump(  # another kind's CRD in its place
        {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
         "spec": {"names": {"kind": "RayJob"}, "versions": []}}))
    with pytest.raises(ClusterConfigError, match="not the CustomResourceDefinition of RayCluster"):
        validate_k8s_manifests(CLUSTER / "kuberay" / "raycluster.yaml", kuberay_crds=tmp_path)


def test_kuberay_crds_are_the_pinned_release() -> None:
    """One KubeRay version everywhere: the CRD folder, the checker, the README's Helm install;
    the CRD files are those of the release (the checksums of tests/data/kuberay-crds/README.md)."""
    readme = (KUBERAY_CRDS.parent / "README.md").read_text()
    assert f"KubeRay **v{KUBERAY_VERSION}**" in readme
    assert sorted(p.name for p in KUBERAY_CRDS.iterdir()) == ["ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"]
    for path in KUBERAY_CRDS.iterdir():
        assert f"`{path.name}` `{hashlib.sha256(path.read_bytes()).hexdigest()}`" in readme, path.name
    installs = [a for a in _readme_commands() if a[:2] == ["helm", "install"]]
    assert installs and all(a[a.index("--version") + 1] == KUBERAY_VERSION for a in installs)
    assert all(a[a.index("--namespace") + 1] == "kuberay-system" for a in installs)  # networkpolicy.yaml


# ----------------------------------------------------------------- security


def test_kuberay_manifests_are_secure() -> None:
    """Token auth, restricted containers, MLflow auth, and the NetworkPolicies admit exactly the
    head's clients: every pod of the manifests, a stranger and the operator are tried."""
    admitted = [a.replace(f"{ROOT}/", "") for a in check_kuberay_security(K8S_MANIFESTS)]
    head = "cluster/kuberay/raycluster.yaml: RayCluster/zosam: spec.headGroupSpec.template"
    submitter = "cluster/kuberay/rayjob.yaml: RayJob/zosam-imagenet-deit: spec.submitterPodTemplate"
    worker = "cluster/kuberay/raycluster.yaml: RayCluster/zosam: spec.workerGroupSpecs[0].template"
    mlflow = "cluster/kuberay/mlflow.yaml: Deployment/mlflow: spec.template"
    for port in (6379, 8265, 10001):
        assert f"{worker} -> {head}:{port}" in admitted
    assert [a for a in admitted if a.startswith(submitter)] == [
        f"{submitter} -> {head}:8265",
        f"{submitter} -> cluster/kuberay/rayjob.yaml: RayJob/zosam-imagenet-deit: "
        "spec.rayClusterSpec.headGroupSpec.template:8265",
    ]
    assert not [a for a in admitted if a.startswith(("any other pod", "a pod of another", mlflow))]
    assert f"{worker} -> {mlflow}:5000" in admitted


def _security_of_mutated(tmp_path: Path, name: str, mutate) -> None:
    """check_kuberay_security over all manifests, one of them mutated (or removed: mutate=None)."""
    paths = []
    for path in K8S_MANIFESTS:
        if path.name == name and mutate is None:
            continue
        docs = _load(path)
        if path.name == name:
            mutate(docs)
        paths.append(tmp_path / path.name)
        paths[-1].write_text(yaml.safe_dump_all(docs))
    check_kuberay_security(paths)


def _worker_container(d):
    return d[0]["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]


def _mlflow_container(d):
    return d[0]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("name", "mutate", "error"),
    [
        ("raycluster.yaml", lambda d: d[0]["spec"].pop("authOptions"), "spec.authOptions.mode"),
        ("rayjob.yaml", lambda d: d[0]["spec"]["rayClusterSpec"]["authOptions"].update(mode="disabled"),
         "spec.rayClusterSpec.authOptions.mode"),
        ("raycluster.yaml", lambda d: _worker_container(d)["securityContext"].pop("allowPrivilegeEscalation"),
         "workerGroupSpecs[1].template.spec.containers[0].securityContext: allowPrivilegeEscalation"),
        ("raycluster.yaml", lambda d: _worker_container(d)["securityContext"].update(readOnlyRootFilesystem=False),
         "readOnlyRootFilesystem must be true"),
        ("raycluster.yaml", lambda d: _worker_container(d)["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
         "capabilities must drop ALL"),
        ("raycluster.yaml", lambda d: _worker_container(d)["securityContext"].update(runAsUser=0),
         "runAsUser must not be 0"),
        # runAsNonRoot / seccomp may come from the pod; missing in both is an error.
        ("raycluster.yaml", lambda d: (_worker_container(d)["securityContext"].pop("seccompProfile"),
                                       d[0]["spec"]["workerGroupSpecs"][1]["template"]["spec"]["securityContext"]
                                       .pop("seccompProfile")), "seccompProfile.type"),
        ("raycluster.yaml", lambda d: d[0]["spec"]["autoscalerOptions"].pop("securityContext"),
         "spec.autoscalerOptions.securityContext"),
        ("rayjob.yaml", lambda d: d[0]["spec"].pop("submitterPodTemplate"), "spec.submitterPodTemplate"),
        ("raycluster.yaml", lambda d: d[0]["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
         "must stay ClusterIP"),
        ("mlflow.yaml", lambda d: d[1]["spec"].update(type="NodePort"), "Service/mlflow: spec.type"),
        # MLflow on 0.0.0.0 without its auth app; MLflow pip-installed at start (the old manifest).
        ("mlflow.yaml", lambda d: _mlflow_container(d)["args"].__delitem__(slice(0, 2)),
         "listens on '0.0.0.0' without authentication"),
        ("mlflow.yaml", lambda d: _mlflow_container(d).update(command=["sh", "-c"], args=[
            "pip install mlflow==3.17.2 && exec mlflow server --host 0.0.0.0 --app-name basic-auth"]),
         "`pip install`"),
        ("mlflow.yaml", lambda d: (_mlflow_container(d)["securityContext"].pop("runAsNonRoot"),
                                   d[0]["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot")),
         "runAsNonRoot must be true"),
        # NetworkPolicies: none at all; one that admits every source to the head; the submitter's
        # port moved off the job API; the Ray pods' mutual rule narrowed to the head ports.
        ("networkpolicy.yaml", None, "port 6379 admits any other pod of the namespace"),
        ("networkpolicy.yaml", lambda d: d[2]["spec"]["ingress"].append({"ports": [{"port": 6379}]}),
         "port 6379 admits"),
        ("networkpolicy.yaml", lambda d: d[2]["spec"]["ingress"][0].update(ports=[{"port": 10001}]),
         "RayJob/zosam-imagenet-deit: spec.submitterPodTemplate, which needs it"),
        ("networkpolicy.yaml", lambda d: d[1]["spec"]["ingress"][0].update(
            ports=[{"port": 6379}, {"port": 8265}, {"port": 10001}]), "Ray's run-time ports"),
        ("networkpolicy.yaml", lambda d: d[3]["spec"]["ingress"][0].update(**{"from": []}),
         "port 5000 admits"),
    ],
    ids=["no-auth", "auth-disabled", "privilege-escalation", "writable-root", "capabilities", "root-user",
         "no-seccomp", "autoscaler-unrestricted", "default-submitter", "head-loadbalancer", "mlflow-nodeport",
         "mlflow-no-auth", "mlflow-pip-at-start", "mlflow-root", "no-networkpolicy", "head-open-6379",
         "submitter-blocked", "ray-pods-blocked", "mlflow-open"],
)
def test_insecure_kuberay_manifests_are_rejected(tmp_path: Path, name: str, mutate, error: str) -> None:
    with pytest.raises(ClusterConfigError, match=re.escape(error)):
        _security_of_mutated(tmp_path, name, mutate)


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=_ids(RAY_CONFIGS))
def test_launcher_configs_require_ray_auth(path: Path, tmp_path: Path) -> None:
    check_launcher_security(path)
    config = _load(path)[0]
    broken = tmp_path / path.name
    for key, old, new, error in [
        ("worker_start_ray_commands", "export RAY_AUTH_MODE=token &&", "", "export RAY_AUTH_MODE=token"),
        ("head_start_ray_commands", ': "${RAY_AUTH_TOKEN:?', ': "${RAY_AUTH_TOKEN:-', "RAY_AUTH_TOKEN:?"),
        ("head_start_ray_commands", "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0", "--dashboard-host"),
    ]:
        mutated = copy.deepcopy(config)
        mutated[key] = [c.replace(old, new) for c in mutated[key]]
        assert mutated != config
        broken.write_text(yaml.safe_dump(mutated))
        with pytest.raises(ClusterConfigError, match=re.escape(error)):
            check_launcher_security(broken)


@pytest.mark.parametrize(
    ("command", "ok"),
    [
        # The VM recipe cluster/README.md had before: 0.0.0.0 and no authentication.
        ("mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri postgresql://x", False),
        ("mlflow server --host=0.0.0.0", False),
        ("mlflow server -h 10.0.0.5 --app-name other-app", False),
        ("pip install mlflow && exec mlflow server --host 0.0.0.0 --workers 2", False),
        ("mlflow server --app-name basic-auth --host 0.0.0.0 --port 5000", True),
        ("mlflow server --app-name=basic-auth --host 10.0.0.5", True),
        ("mlflow server --port 5000", True),  # MLflow's default host is 127.0.0.1
        ("mlflow server --host 127.0.0.1 && mlflow server --host 0.0.0.0", False),
        ("mlflow ui --host 127.0.0.1", True),
    ],
)
def test_check_mlflow_server_command(command: str, ok: bool) -> None:
    if ok:
        check_mlflow_server_command(command)
    else:
        with pytest.raises(ClusterConfigError, match="without authentication"):
            check_mlflow_server_command(command)
    with pytest.raises(ClusterConfigError, match=re.escape("'0.0.0.0'")):
        check_mlflow_server_command("mlflow server", env={"MLFLOW_HOST": "0.0.0.0"})


def test_readme_mlflow_servers_require_auth() -> None:
    """Every `mlflow server` cluster/README.md shows, in code blocks or inline, passes the check."""
    servers = [line[line.index("mlflow server"):].split("`")[0] for line in README.read_text().splitlines()
               if "mlflow server" in line]
    authenticated = 0
    for command in servers:
        check_mlflow_server_command(command, "cluster/README.md: ")
        authenticated += "--app-name basic-auth" in command
    assert authenticated >= 1, servers


# ----------------------------------------------------------------- README commands


def _readme_commands() -> list[list[str]]:
    """Shell commands of the README's ``sh`` blocks, as argv lists, split at && ; |."""
    text = README.read_text()
    commands: list[list[str]] = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv: list[str] = []
            for token in shlex.split(line, comments=True):
                if token in ("&&", "||", ";", "|"):
                    commands.append(argv)
                    argv = []
                else:
                    argv.append(token)
            commands.append(argv)
    return [c for c in commands if c]


def _zosam_commands() -> list[list[str]]:
    """Every ``zosam ...`` the README runs, directly or after ``ray job submit ... --``."""
    found = []
    for argv in _readme_commands():
        if argv[:3] == ["ray", "job", "submit"]:
            argv = argv[argv.index("--") + 1:]
        if argv and argv[0] == "zosam":
            found.append(argv)
    rayjob = _load(CLUSTER / "kuberay" / "rayjob.yaml")[0]
    found.append(shlex.split(rayjob["spec"]["entrypoint"]))
    return [list(a) for a in dict.fromkeys(map(tuple, found))]  # unique, in order


def test_readme_has_the_commands_it_promises() -> None:
    argvs = [" ".join(a) for a in _readme_commands()]
    for expected in ("ray up -y cluster/aws.yaml", "ray down -y cluster/aws.yaml",
                     "kubectl apply -n zosam -f cluster/kuberay/rayjob.yaml",
                     "zosam sweep tune/imagenet_deit.yaml --address auto"):
        assert any(expected in a for a in argvs), expected
    assert any(a[:3] == ["ray", "job", "logs"] for a in _readme_commands())


def test_readme_ray_job_submit_commands_are_well_formed() -> None:
    submits = [a for a in _readme_commands() if a[:3] == ["ray", "job", "submit"]]
    assert len(submits) >= 4
    for argv in submits:
        options = argv[:argv.index("--")]
        assert options[options.index("--working-dir") + 1] == "."
        runtime_env = json.loads(options[options.index("--runtime-env-json") + 1])
        assert ".venv" in runtime_env["excludes"]


@pytest.mark.parametrize("argv", _zosam_commands(), ids=lambda a: " ".join(a))
def test_readme_zosam_commands_parse_to_what_they_mean(argv: list[str]) -> None:
    """Each command parses, and into what it means: ``train`` takes any stray word as an
    override (``nargs="*"``), so every override must be ``key.path=value`` of a run-config
    field; a sweep joins the running cluster (``--address auto``) with a spec that exists; a
    benchmark's own arguments parse with that benchmark's parser."""
    import dataclasses
    import importlib

    from zosam.cli import BENCHMARKS, build_parser
    from zosam.config import RunConfig

    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as err:  # argparse reports errors by exiting
        pytest.fail(f"`{' '.join(argv)}` does not parse (exit {err.code})")
    if args.command == "train":
        assert args.config is not None and re.fullmatch(r"configs/[\w<>.-]+\.yaml", args.config), args.config
        assert "<" in args.config or (ROOT / args.config).is_file(), args.config  # <run>: the reader's choice
        fields = {f.name for f in dataclasses.fields(RunConfig)}
        for item in args.overrides:
            key, eq, value = item.partition("=")
            assert eq and value and key.split(".")[0] in fields, f"{item!r} is not a key.path=value override"
    elif args.command == "sweep":
        assert args.spec.startswith("tune/") and (ROOT / args.spec).is_file(), args.spec
        assert args.address == "auto", "a sweep on the cluster joins it: --address auto"
        assert all("=" in item for item in args.overrides), args.overrides
    elif args.command == "bench":
        importlib.import_module(BENCHMARKS[args.name]).build_parser().parse_args(args.args)
    else:
        pytest.fail(f"`{' '.join(argv)}`: no check for zosam {args.command}; add one")


def test_readme_spec_files_exist() -> None:
    """The sweep specs and run configs the README names are in the repository."""
    paths = {tok for argv in _zosam_commands() for tok in argv
             if re.fullmatch(r"(tune|configs)/[\w./-]+\.yaml", tok)}
    assert "tune/imagenet_deit.yaml" in paths
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, f"named in cluster/README.md but missing: {missing}"


# ----------------------------------------------------------------- multi-node settings


@pytest.mark.parametrize(
    ("uri", "storage", "nodes", "error"),
    [
        ("http://mlflow:5000", "s3://b/zosam", 4, None),
        ("https://mlflow.example.org", "gs://b/zosam", 2, None),
        ("sqlite:///mlflow.db", "/tmp/ray", 1, None),  # one node: local is fine
        ("sqlite:///mlflow.db", "s3://b/zosam", 2, "MLFLOW_TRACKING_URI='sqlite:///mlflow.db'"),
        ("/home/me/mlruns", "s3://b/zosam", 3, "MLFLOW_TRACKING_URI"),
        ("http://mlflow:5000", "/home/ray/results", 2, "ZOSAM_STORAGE_PATH='/home/ray/results'"),
        ("http://mlflow:5000", "/mnt/data/ray", 2, None),
    ],
)
def test_check_multi_node_settings(uri: str, storage: str, nodes: int, error: str | None) -> None:
    if error is None:
        check_multi_node_settings(uri, storage, nodes)
    else:
        with pytest.raises(ValueError, match=re.escape(error)):
            check_multi_node_settings(uri, storage, nodes)
