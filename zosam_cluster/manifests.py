"""Kubernetes manifests, offline: standard objects with kubernetes-validate (strict), KubeRay's
``RayCluster`` / ``RayJob`` against the CRDs of the pinned operator release."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from zosam_cluster.common import KUBERNETES_VERSION, ClusterConfigError, field_path, load_yaml_documents
from zosam_cluster.pods import kuberay_pod_templates

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The CRDs say only "metadata: object" (the API server checks ObjectMeta itself): the part of
# ObjectMeta a manifest sets.
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _NAME, "namespace": _NAME, "labels": _STR_MAP, "annotations": _STR_MAP},
}

#: The KubeRay operator release whose CRDs the manifests are checked against; cluster/README.md
#: installs this release's Helm chart.
KUBERAY_VERSION = "1.7.0"
#: CRD file of each KubeRay kind, as named under ``ray-operator/config/crd/bases/`` of the release.
KUBERAY_CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def _strict(schema: Any) -> Any:
    """A CRD's structural schema with unknown fields rejected, as ``kubectl apply`` does.

    The API server prunes fields a structural schema does not declare, and rejects them under
    strict field validation (kubectl's default); plain JSON Schema would let them pass. So
    every object that declares ``properties`` (and neither ``additionalProperties`` nor
    ``x-kubernetes-preserve-unknown-fields``) gets ``additionalProperties: false``, and
    OpenAPI's ``nullable`` becomes a ``null`` type.
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.lru_cache(maxsize=4)
def load_kuberay_schemas(crd_dir: str | Path) -> dict[str, dict[str, Any]]:
    """JSON schemas of KubeRay's ``ray.io/v1`` kinds, from the operator's CRD files.

    Args:
        crd_dir: a folder with the release's ``ray.io_rayclusters.yaml`` and
            ``ray.io_rayjobs.yaml`` (``tests/data/kuberay-crds/v<KUBERAY_VERSION>/``).

    Returns:
        kind -> the ``openAPIV3Schema`` of its ``v1`` version, made strict (:func:`_strict`),
        with ``apiVersion``, ``kind``, ``metadata`` and ``spec`` required.

    Raises:
        ClusterConfigError: a file is missing or is not the CRD of that kind with a v1 version.
    """
    schemas = {}
    for kind, name in KUBERAY_CRD_FILES.items():
        path = Path(crd_dir) / name
        if not path.is_file():
            raise ClusterConfigError(f"{path}: KubeRay CRD file of {kind} not found")
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition" or (
            crd["spec"]["names"]["kind"] != kind
        ):
            raise ClusterConfigError(f"{path}: not the CustomResourceDefinition of {kind}")
        v1 = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        if not v1:
            raise ClusterConfigError(f"{path}: the CRD of {kind} has no v1 version")
        schema = _strict(v1[0]["schema"]["openAPIV3Schema"])
        schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
        schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
        schema["properties"]["kind"] = {"const": kind}
        schema["properties"]["metadata"] = _METADATA
        schema["properties"].pop("status", None)  # written by the operator, not by a manifest
        schemas[kind] = schema
    return schemas


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
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        raise ClusterConfigError(f"{where}: {field_path(err.path)}: {err.message}") from None
    except kubernetes_validate.SchemaNotFoundError as err:
        raise ClusterConfigError(f"{where}: {err.message}") from None


@functools.lru_cache(maxsize=4)
def _kuberay_validators(crd_dir: str) -> dict[str, Any]:

    return {kind: jsonschema.Draft202012Validator(s) for kind, s in load_kuberay_schemas(crd_dir).items()}


def _validate_kuberay(where: str, obj: dict[str, Any], version: str, crd_dir: str | Path) -> None:
    kind = obj["kind"]
    validator = _kuberay_validators(str(crd_dir))[kind]
    # Report the deepest error first: it names the field rather than a whole subtree.
    errors = sorted(validator.iter_errors(obj), key=lambda e: -len(e.absolute_path))
    if errors:
        err = errors[0]
        raise ClusterConfigError(f"{where}: {field_path(err.absolute_path)}: {err.message}")
    spec = obj["spec"]
    if kind == "RayCluster":
        _check_worker_replicas(where, "spec", spec)
    elif "rayClusterSpec" in spec:
        _check_worker_replicas(where, "spec.rayClusterSpec", spec["rayClusterSpec"])
    for tmpl_path, template in kuberay_pod_templates(kind, spec):
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


def validate_k8s_manifests(
    path: str | Path, *, version: str = KUBERNETES_VERSION, kuberay_crds: str | Path | None = None
) -> list[str]:
    """Validate every object of a (multi-document) Kubernetes YAML file, offline.

    Args:
        path: a manifest file (``cluster/kuberay/*.yaml``).
        version: Kubernetes version whose schemas are used.
        kuberay_crds: folder of the KubeRay release's CRD files (:func:`load_kuberay_schemas`);
            needed only when the file holds a ``ray.io`` object.

    Returns:
        ``"Kind/name"`` of every validated object, in file order.

    Raises:
        ClusterConfigError: an object fails its schema (message: file, object, field path),
            the file holds no object, or an object's kind has no schema at all.
    """
    path = Path(path)
    checked: list[str] = []
    for index, obj in enumerate(load_yaml_documents(path)):
        if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
            raise ClusterConfigError(f"{path}: document {index}: needs apiVersion and kind")
        name = (obj.get("metadata") or {}).get("name", "?")
        where = f"{path}: {obj['kind']}/{name}"
        if obj["apiVersion"].startswith("ray.io/"):
            if obj["kind"] not in KUBERAY_CRD_FILES:
                raise ClusterConfigError(
                    f"{where}: no schema for KubeRay kind {obj['kind']!r}; "
                    f"allowed: {', '.join(KUBERAY_CRD_FILES)}"
                )
            if kuberay_crds is None:
                raise ClusterConfigError(
                    f"{where}: KubeRay objects are checked against the operator's CRDs: pass "
                    f"kuberay_crds=<folder with {', '.join(KUBERAY_CRD_FILES.values())}>"
                )
            _validate_kuberay(where, obj, version, kuberay_crds)
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
