"""Offline checks of the files under ``cluster/``: Ray launcher configs and Kubernetes manifests.

Two validators, both without network access:

- :func:`validate_ray_cluster_config` runs the checks ``ray up`` itself runs before it
  talks to a cloud: Ray's defaults are merged in (``prepare_config``), then the merged
  config is checked against Ray's JSON schema (``ray/autoscaler/ray-schema.json``) and
  Ray's semantic rules (``validate_config``: head node type exists, ``min_workers`` sum
  within ``max_workers``, ...). What ``ray up`` does after that needs cloud credentials
  (filling in instance resources, creating IAM roles / firewall rules) and is not run.
- :func:`validate_k8s_manifests` checks every standard object (Deployment, Service, ...)
  with ``kubernetes-validate`` in strict mode (unknown fields rejected). That package has
  no schema for KubeRay's custom resources (``RayCluster``, ``RayJob``), so for those the
  embedded pod templates are checked with ``kubernetes-validate`` as ``PodTemplate``
  objects, and the CRD fields around them against :data:`KUBERAY_SCHEMAS`, a small schema
  of our own written from KubeRay's ``ray.io/v1`` Go types. It covers the fields KubeRay
  v1 defines at the levels it describes (unknown fields there are rejected), but it is not
  KubeRay's generated CRD schema: CEL rules and defaults of the operator are not checked.

Every error is a :class:`ClusterConfigError` whose message names the file, the object and
the dotted path of the offending field.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

# Kubernetes minor version the manifests are checked against (kubernetes-validate ships
# schemas up to 1.37; managed clusters of 2026 run 1.33 or newer).
KUBERNETES_VERSION = "1.33"


class ClusterConfigError(ValueError):
    """A cluster config or manifest failed validation; the message names file and field."""


def _field_path(parts: Iterator[Any] | list[Any]) -> str:
    """Dotted path of a JSON-schema error location, list indices as ``[i]``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _load_yaml_documents(path: Path) -> list[Any]:
    """All non-empty YAML documents of ``path``; a parse error names the file."""
    try:
        return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except yaml.YAMLError as err:
        raise ClusterConfigError(f"{path}: not valid YAML: {err}") from None


# --------------------------------------------------------------------------- Ray launcher


def validate_ray_cluster_config(path: str | Path) -> dict[str, Any]:
    """Check a ``ray up`` cluster config the way Ray does before contacting the cloud.

    Args:
        path: a Ray cluster launcher YAML file (``cluster/aws.yaml``, ``cluster/gcp.yaml``).

    Returns:
        The config with Ray's provider defaults merged in (what the launcher would use).

    Raises:
        ClusterConfigError: the file is not a mapping, Ray's schema rejects a field (the
            message gives its dotted path), or one of Ray's semantic rules fails.
    """
    # Heavy import (ray) kept local: the CLI imports this module.
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    path = Path(path)
    docs = _load_yaml_documents(path)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise ClusterConfigError(f"{path}: a Ray cluster config is one YAML mapping")
    raw = docs[0]
    if not isinstance(raw.get("provider"), dict) or "type" not in raw["provider"]:
        raise ClusterConfigError(f"{path}: provider.type is required")
    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    except jsonschema.ValidationError as err:
        raise ClusterConfigError(
            f"{path}: {_field_path(err.absolute_path)}: {err.message}"
        ) from None
    except (ValueError, KeyError, NotImplementedError, AssertionError) as err:
        raise ClusterConfigError(f"{path}: {err}") from None
    return prepared


# --------------------------------------------------------------------------- Kubernetes

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
# Pod templates are checked by kubernetes-validate; here only "an object".
_TEMPLATE = {"type": "object", "required": ["spec"]}

_HEAD_GROUP = {
    "type": "object",
    "required": ["template"],
    "additionalProperties": False,
    "properties": {
        "template": _TEMPLATE,
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "rayStartParams": _STR_MAP,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
    },
}
_WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "template", "maxReplicas"],
    "additionalProperties": False,
    "properties": {
        "suspend": {"type": "boolean"},
        "groupName": _NAME,
        "replicas": _INT32,
        "minReplicas": _INT32,
        "maxReplicas": _INT32,
        "idleTimeoutSeconds": _INT32,
        "rayStartParams": _STR_MAP,
        "template": _TEMPLATE,
        "scaleStrategy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"workersToDelete": {"type": "array", "items": {"type": "string"}}},
        },
        "numOfHosts": {"type": "integer", "minimum": 1},
    },
}
_RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "suspend": {"type": "boolean"},
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "autoscalerOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "resources": {"type": "object"},
                "image": {"type": "string"},
                "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                "securityContext": {"type": "object"},
                "idleTimeoutSeconds": _INT32,
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "env": {"type": "array"},
                "envFrom": {"type": "array"},
                "volumeMounts": {"type": "array"},
            },
        },
        "headServiceAnnotations": _STR_MAP,
        "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "headGroupSpec": _HEAD_GROUP,
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    },
}
_RAY_JOB_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": _INT32,
        "rayClusterSpec": _RAY_CLUSTER_SPEC,
        "submitterPodTemplate": _TEMPLATE,
        "metadata": _STR_MAP,
        "clusterSelector": _STR_MAP,
        "submitterConfig": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"backoffLimit": _INT32},
        },
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "deletionPolicy": {"enum": ["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"]},
        "entrypoint": {"type": "string", "minLength": 1},
        "runtimeEnvYAML": {"type": "string"},
        "jobId": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
        "entrypointResources": {"type": "string"},
        "entrypointNumCpus": {"type": "number", "minimum": 0},
        "entrypointNumGpus": {"type": "number", "minimum": 0},
        "ttlSecondsAfterFinished": _INT32,
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "suspend": {"type": "boolean"},
    },
    # A RayJob either brings its cluster or selects a running one.
    "oneOf": [{"required": ["rayClusterSpec"]}, {"required": ["clusterSelector"]}],
}


def _crd_schema(kind: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": _NAME, "namespace": _NAME, "labels": _STR_MAP,
                               "annotations": _STR_MAP},
            },
            "spec": spec,
        },
    }


#: Our own structural schemas of KubeRay's ``ray.io/v1`` resources (see module docstring).
KUBERAY_SCHEMAS: dict[str, dict[str, Any]] = {
    "RayCluster": _crd_schema("RayCluster", _RAY_CLUSTER_SPEC),
    "RayJob": _crd_schema("RayJob", _RAY_JOB_SPEC),
}


def _kuberay_pod_templates(kind: str, spec: Mapping[str, Any]) -> Iterator[tuple[str, dict]]:
    """(dotted path, pod template) of every pod template inside a KubeRay spec."""
    if kind == "RayJob":
        if "submitterPodTemplate" in spec:
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]
        if "rayClusterSpec" in spec:
            for sub_path, tmpl in _kuberay_pod_templates("RayCluster", spec["rayClusterSpec"]):
                yield sub_path.replace("spec.", "spec.rayClusterSpec.", 1), tmpl
        return
    yield "spec.headGroupSpec.template", spec["headGroupSpec"]["template"]
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        yield f"spec.workerGroupSpecs[{i}].template", group["template"]


def _check_worker_replicas(where: str, prefix: str, spec: Mapping[str, Any]) -> None:
    """KubeRay requires minReplicas <= replicas <= maxReplicas in each worker group."""
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        lo, hi = group.get("minReplicas", 0), group["maxReplicas"]
        n = group.get("replicas", lo)
        if not lo <= n <= hi or lo > hi:
            raise ClusterConfigError(
                f"{where}: {prefix}.workerGroupSpecs[{i}]: minReplicas={lo}, replicas={n}, "
                f"maxReplicas={hi} is invalid; need minReplicas <= replicas <= maxReplicas"
            )


def _check_extended_resources(where: str, pod_path: str, pod_spec: Mapping[str, Any]) -> None:
    """Extended resources (``nvidia.com/gpu``) cannot be overcommitted: requests == limits."""
    for kind in ("initContainers", "containers"):
        for i, container in enumerate(pod_spec.get(kind, [])):
            res = container.get("resources", {})
            limits, requests = res.get("limits", {}), res.get("requests", {})
            for name, value in requests.items():
                if "/" in name and not name.startswith("kubernetes.io/") and (
                    str(limits.get(name)) != str(value)
                ):
                    raise ClusterConfigError(
                        f"{where}: {pod_path}.spec.{kind}[{i}].resources: extended resource "
                        f"{name!r} needs limits equal to requests ({value!r}), got "
                        f"{limits.get(name)!r}"
                    )


def _validate_standard(where: str, obj: dict[str, Any], version: str) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        raise ClusterConfigError(f"{where}: {_field_path(err.path)}: {err.message}") from None
    except kubernetes_validate.SchemaNotFoundError as err:
        raise ClusterConfigError(f"{where}: {err.message}") from None


def _validate_kuberay(where: str, obj: dict[str, Any], version: str) -> None:
    import jsonschema

    kind = obj["kind"]
    validator = jsonschema.Draft202012Validator(KUBERAY_SCHEMAS[kind])
    # Report the deepest error first: it names the field rather than a whole subtree.
    errors = sorted(validator.iter_errors(obj), key=lambda e: -len(e.absolute_path))
    if errors:
        err = errors[0]
        raise ClusterConfigError(f"{where}: {_field_path(err.absolute_path)}: {err.message}")
    spec = obj["spec"]
    if kind == "RayCluster":
        _check_worker_replicas(where, "spec", spec)
    elif "rayClusterSpec" in spec:
        _check_worker_replicas(where, "spec.rayClusterSpec", spec["rayClusterSpec"])
    for tmpl_path, template in _kuberay_pod_templates(kind, spec):
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": obj["metadata"]["name"]},
            "template": template,
        }
        try:
            _validate_standard(where, pod_template, version)
        except ClusterConfigError as err:
            # Map "template.spec..." of the wrapper back to the field inside the CRD.
            msg = str(err).replace(f"{where}: template", f"{where}: {tmpl_path}", 1)
            raise ClusterConfigError(msg) from None
        _check_extended_resources(where, tmpl_path, template.get("spec", {}))


def validate_k8s_manifests(path: str | Path, *, version: str = KUBERNETES_VERSION) -> list[str]:
    """Validate every object of a (multi-document) Kubernetes YAML file, offline.

    Args:
        path: a manifest file (``cluster/kuberay/*.yaml``).
        version: Kubernetes version whose schemas are used.

    Returns:
        ``"Kind/name"`` of every validated object, in file order.

    Raises:
        ClusterConfigError: an object fails its schema (message: file, object, field path),
            the file holds no object, or an object's kind has no schema at all.
    """
    path = Path(path)
    checked: list[str] = []
    for index, obj in enumerate(_load_yaml_documents(path)):
        if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
            raise ClusterConfigError(f"{path}: document {index}: needs apiVersion and kind")
        name = (obj.get("metadata") or {}).get("name", "?")
        where = f"{path}: {obj['kind']}/{name}"
        if obj["apiVersion"].startswith("ray.io/"):
            if obj["kind"] not in KUBERAY_SCHEMAS:
                raise ClusterConfigError(f"{where}: no schema for KubeRay kind {obj['kind']!r}")
            _validate_kuberay(where, obj, version)
        else:
            _validate_standard(where, obj, version)
            if obj["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
                _check_extended_resources(
                    where, "spec.template", obj["spec"]["template"].get("spec", {})
                )
        checked.append(f"{obj['kind']}/{name}")
    if not checked:
        raise ClusterConfigError(f"{path}: no Kubernetes objects found")
    return checked


# --------------------------------------------------------------------------- multi-node

#: URI schemes of object stores every node of a cluster can reach.
SHARED_STORAGE_SCHEMES = ("s3://", "gs://", "gcs://", "abfss://", "hdfs://")


def check_multi_node_settings(tracking_uri: str, storage_path: str, num_nodes: int) -> None:
    """Reject settings that only work on one machine, for a cluster of ``num_nodes`` nodes.

    On a multi-node cluster each Tune trial logs to MLflow from whichever node runs it, and
    a restored trial may resume on another node, so the tracking store must be a server
    (``http(s)://``; a ``sqlite:`` file or local path would exist on one node only) and
    Ray's ``storage_path`` must be shared object storage (or a path the caller knows to be
    a shared file system, given as ``file://`` or an absolute path under ``/mnt/``).

    Raises:
        ValueError: naming the setting, the bad value and what a cluster needs.
    """
    from zosam.validate import ConfigError

    if num_nodes <= 1:
        return
    if not tracking_uri.startswith(("http://", "https://", "databricks")):
        raise ConfigError(
            f"MLFLOW_TRACKING_URI={tracking_uri!r} is invalid on a {num_nodes}-node cluster: "
            "trials on other nodes cannot reach a local store; use a tracking server "
            "(http://host:5000, see cluster/README.md)"
        )
    shared_fs = storage_path.startswith("/mnt/") or storage_path.startswith("file:///mnt/")
    if not (storage_path.startswith(SHARED_STORAGE_SCHEMES) or shared_fs):
        raise ConfigError(
            f"ZOSAM_STORAGE_PATH={storage_path!r} is invalid on a {num_nodes}-node cluster: "
            f"checkpoints must be on shared storage; allowed: "
            f"{', '.join(SHARED_STORAGE_SCHEMES)} or a shared file system under /mnt/"
        )
