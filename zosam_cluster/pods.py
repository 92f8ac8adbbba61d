"""The pods a set of manifests makes (KubeRay's head, workers and submitter; Deployments...),
with the labels the operator adds, and the ports the security checks reason about."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

#: Ports of the Ray head that only the head's clients may reach: GCS, dashboard/job API, Ray Client.
RAY_HEAD_PORTS = (6379, 8265, 10001)
#: The head port a RayJob's submitter and the KubeRay operator use (the job API).
RAY_JOB_API_PORT = 8265
#: Where the KubeRay operator runs (cluster/README.md's Helm install) and its pods' label.
KUBERAY_OPERATOR_NAMESPACE = "kuberay-system"
KUBERAY_OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}
MLFLOW_PORT = 5000


def kuberay_pod_templates(kind: str, spec: Mapping[str, Any]) -> Iterator[tuple[str, dict]]:
    """(dotted path, pod template) of every pod template inside a KubeRay spec."""
    if kind == "RayJob":
        if "submitterPodTemplate" in spec:
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]
        if "rayClusterSpec" in spec:
            for sub_path, tmpl in kuberay_pod_templates("RayCluster", spec["rayClusterSpec"]):
                yield sub_path.replace("spec.", "spec.rayClusterSpec.", 1), tmpl
        return
    yield "spec.headGroupSpec.template", spec["headGroupSpec"]["template"]
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        yield f"spec.workerGroupSpecs[{i}].template", group["template"]


class Pod(NamedTuple):
    where: str  # file: Kind/name: dotted path of the pod template
    role: str  # "head", "worker", "submitter" or "pod"
    labels: dict[str, str]
    spec: dict[str, Any]


def ray_cluster_pods(where: str, prefix: str, spec: Mapping[str, Any]) -> Iterator[Pod]:
    """The pods KubeRay creates for a RayCluster spec, with the labels the operator adds."""
    for path, tmpl in kuberay_pod_templates("RayCluster", spec):
        role = "head" if "headGroupSpec" in path else "worker"
        labels = {**(tmpl.get("metadata") or {}).get("labels", {}),
                  "ray.io/node-type": role, "ray.io/is-ray-node": "yes"}
        yield Pod(f"{where}: {path.replace('spec.', prefix + '.', 1)}", role, labels, tmpl.get("spec", {}))


def manifest_pods(where: str, obj: Mapping[str, Any]) -> Iterator[Pod]:
    """Every pod a manifest object makes (Deployments and the like, KubeRay's resources)."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "RayCluster":
        yield from ray_cluster_pods(where, "spec", spec)
    elif kind == "RayJob":
        if "rayClusterSpec" in spec:
            yield from ray_cluster_pods(where, "spec.rayClusterSpec", spec["rayClusterSpec"])
        if "submitterPodTemplate" in spec:
            tmpl = spec["submitterPodTemplate"]
            labels = {**(tmpl.get("metadata") or {}).get("labels", {}), "ray.io/originated-from-crd": "RayJob"}
            yield Pod(f"{where}: spec.submitterPodTemplate", "submitter", labels, tmpl.get("spec", {}))
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        tmpl = spec["template"]
        yield Pod(f"{where}: spec.template", "pod", dict((tmpl.get("metadata") or {}).get("labels", {})),
                   tmpl.get("spec", {}))
    elif kind == "Pod":
        yield Pod(where, "pod", dict(obj["metadata"].get("labels", {})), spec)
