"""Offline checks of the files under ``cluster/``: Ray launcher configs and Kubernetes manifests.

Validators, all without network access:

- :func:`validate_ray_cluster_config` runs the checks ``ray up`` itself runs before it
  talks to a cloud: Ray's defaults are merged in (``prepare_config``), then the merged
  config is checked against Ray's JSON schema (``ray/autoscaler/ray-schema.json``) and
  Ray's semantic rules (``validate_config``: head node type exists, ``min_workers`` sum
  within ``max_workers``, ...). What ``ray up`` does after that needs cloud credentials
  (filling in instance resources, creating IAM roles / firewall rules) and is not run.
- :func:`validate_k8s_manifests` checks every standard object (Deployment, Service, ...)
  with ``kubernetes-validate`` in strict mode (unknown fields rejected). That package has
  no schema for KubeRay's custom resources (``RayCluster``, ``RayJob``): those are checked
  against the ``openAPIV3Schema`` of the CRDs of the KubeRay operator release
  :data:`KUBERAY_VERSION` (the CRD YAML files, passed as ``kuberay_crds``; the repository
  keeps them in ``tests/data/kuberay-crds/``), with unknown fields rejected as the API
  server's strict field validation does, and their pod templates also with
  ``kubernetes-validate``. Not checked: the CRDs' CEL rules (``x-kubernetes-validations``)
  and the operator's own validation in Go (e.g. ``submissionMode`` values).
- Security: :func:`check_kuberay_security` (Ray token auth, restricted securityContexts,
  NetworkPolicies evaluated for every pod, MLflow authentication), :func:`check_launcher_security`
  (token auth and a loopback dashboard in ``ray up`` configs) and
  :func:`check_mlflow_server_command` (no ``mlflow server`` beyond loopback without auth).

Every error is a :class:`ClusterConfigError` whose message names the file, the object and
the dotted path of the offending field.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

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


@functools.lru_cache(maxsize=4)
def _kuberay_validators(crd_dir: str) -> dict[str, Any]:
    import jsonschema

    return {kind: jsonschema.Draft202012Validator(s) for kind, s in load_kuberay_schemas(crd_dir).items()}


def _validate_kuberay(where: str, obj: dict[str, Any], version: str, crd_dir: str | Path) -> None:
    kind = obj["kind"]
    validator = _kuberay_validators(str(crd_dir))[kind]
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
    for index, obj in enumerate(_load_yaml_documents(path)):
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


# --------------------------------------------------------------------------- security

#: Ports of the Ray head that only the head's clients may reach: GCS, dashboard/job API, Ray Client.
RAY_HEAD_PORTS = (6379, 8265, 10001)
#: The head port a RayJob's submitter and the KubeRay operator use (the job API).
RAY_JOB_API_PORT = 8265
#: Where the KubeRay operator runs (cluster/README.md's Helm install) and its pods' label.
KUBERAY_OPERATOR_NAMESPACE = "kuberay-system"
KUBERAY_OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}
MLFLOW_PORT = 5000
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
_SHELL_SEPARATORS = ("&&", "||", ";", "|", "&")


def check_mlflow_server_command(
    command: str | list[str], where: str = "", env: Mapping[str, str] | None = None
) -> None:
    """Refuse an ``mlflow server`` that listens beyond loopback without authentication.

    Args:
        command: a shell command line or argv; every ``mlflow server`` in it is checked.
        where: prefix of the error message (file, object).
        env: the environment the command runs with (``MLFLOW_HOST`` sets the host too).

    Raises:
        ClusterConfigError: a server binds a non-loopback host (``--host``/``-h``/``MLFLOW_HOST``;
            MLflow's default is 127.0.0.1) and does not run ``--app-name basic-auth``.
    """
    import shlex

    argv = shlex.split(command, comments=True) if isinstance(command, str) else list(command)
    for i in range(len(argv) - 1):
        if Path(argv[i]).name != "mlflow" or argv[i + 1] != "server":
            continue
        args = []
        for token in argv[i + 2:]:
            if token in _SHELL_SEPARATORS:
                break
            args.append(token)
        opts: dict[str, str] = {}
        for j, token in enumerate(args):
            name, eq, value = token.partition("=")
            if name in ("--host", "-h", "--app-name") and (eq or j + 1 < len(args)):
                opts["--host" if name == "-h" else name] = value if eq else args[j + 1]
        host = opts.get("--host", (env or {}).get("MLFLOW_HOST", "127.0.0.1"))
        if host not in _LOOPBACK_HOSTS and opts.get("--app-name") != "basic-auth":
            raise ClusterConfigError(
                f"{where}`mlflow server` listens on {host!r} without authentication: add "
                f"`--app-name basic-auth` (MLflow's basic-auth app) or bind one of "
                f"{', '.join(_LOOPBACK_HOSTS)} behind an authenticating proxy"
            )


def _check_restricted(where: str, sc: Mapping[str, Any] | None, pod_sc: Mapping[str, Any]) -> None:
    """One container's effective securityContext meets the restricted settings of cluster/."""
    sc = sc or {}
    problems = []
    if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
        problems.append("runAsNonRoot must be true")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        problems.append("runAsUser must not be 0")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation must be false")
    if sc.get("privileged"):
        problems.append("privileged must not be true")
    if "ALL" not in (sc.get("capabilities") or {}).get("drop", []) or (sc.get("capabilities") or {}).get("add"):
        problems.append("capabilities must drop ALL and add none")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem must be true (mount an emptyDir where it writes)")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append(f"seccompProfile.type must be RuntimeDefault (got {seccomp!r})")
    if problems:
        raise ClusterConfigError(f"{where}.securityContext: {'; '.join(problems)}")


class _Pod(NamedTuple):
    where: str  # file: Kind/name: dotted path of the pod template
    role: str  # "head", "worker", "submitter" or "pod"
    labels: dict[str, str]
    spec: dict[str, Any]


def _ray_cluster_pods(where: str, prefix: str, spec: Mapping[str, Any]) -> Iterator[_Pod]:
    """The pods KubeRay creates for a RayCluster spec, with the labels the operator adds."""
    for path, tmpl in _kuberay_pod_templates("RayCluster", spec):
        role = "head" if "headGroupSpec" in path else "worker"
        labels = {**(tmpl.get("metadata") or {}).get("labels", {}),
                  "ray.io/node-type": role, "ray.io/is-ray-node": "yes"}
        yield _Pod(f"{where}: {path.replace('spec.', prefix + '.', 1)}", role, labels, tmpl.get("spec", {}))


def _manifest_pods(where: str, obj: Mapping[str, Any]) -> Iterator[_Pod]:
    """Every pod a manifest object makes (Deployments and the like, KubeRay's resources)."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "RayCluster":
        yield from _ray_cluster_pods(where, "spec", spec)
    elif kind == "RayJob":
        if "rayClusterSpec" in spec:
            yield from _ray_cluster_pods(where, "spec.rayClusterSpec", spec["rayClusterSpec"])
        if "submitterPodTemplate" in spec:
            tmpl = spec["submitterPodTemplate"]
            labels = {**(tmpl.get("metadata") or {}).get("labels", {}), "ray.io/originated-from-crd": "RayJob"}
            yield _Pod(f"{where}: spec.submitterPodTemplate", "submitter", labels, tmpl.get("spec", {}))
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        tmpl = spec["template"]
        yield _Pod(f"{where}: spec.template", "pod", dict((tmpl.get("metadata") or {}).get("labels", {})),
                   tmpl.get("spec", {}))
    elif kind == "Pod":
        yield _Pod(where, "pod", dict(obj["metadata"].get("labels", {})), spec)


def _selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics (an empty selector matches everything)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


class _Source(NamedTuple):
    name: str
    labels: dict[str, str]
    namespace_labels: dict[str, str]  # {} = the policies' own namespace


def network_policy_admits(policies: list[Mapping[str, Any]], target: _Pod, source: _Source, port: int) -> bool:
    """Whether the NetworkPolicies of one namespace admit ``source`` to ``target``'s TCP ``port``.

    Kubernetes' semantics: a pod selected by no Ingress policy admits everything; otherwise a
    connection is admitted when some rule of some selecting policy admits its source and port.
    An ``ipBlock`` peer is taken to match every source (the check errs towards "admitted").
    """
    named_ports = {p.get("name"): p["containerPort"] for c in target.spec.get("containers", [])
                   for p in c.get("ports", []) if p.get("name")}
    selecting = [
        p for p in policies
        if "Ingress" in (p["spec"].get("policyTypes") or ["Ingress"])
        and _selector_matches(p["spec"].get("podSelector"), target.labels)
    ]
    if not selecting:
        return True

    def peer_matches(peer: Mapping[str, Any]) -> bool:
        if "ipBlock" in peer:
            return True
        if "namespaceSelector" in peer:
            ns_ok = _selector_matches(peer["namespaceSelector"], source.namespace_labels or {"_same": "yes"})
        else:
            ns_ok = not source.namespace_labels
        return ns_ok and ("podSelector" not in peer or _selector_matches(peer["podSelector"], source.labels))

    def port_matches(entry: Mapping[str, Any]) -> bool:
        if entry.get("protocol", "TCP") != "TCP":
            return False
        if "port" not in entry:
            return True
        lo = named_ports.get(entry["port"], entry["port"])
        return isinstance(lo, int) and lo <= port <= entry.get("endPort", lo)

    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            if (not rule.get("from") or any(peer_matches(p) for p in rule["from"])) and (
                not rule.get("ports") or any(port_matches(e) for e in rule["ports"])
            ):
                return True
    return False


def _check_ray_auth(where: str, spec: Mapping[str, Any]) -> None:
    mode = (spec.get("authOptions") or {}).get("mode")
    if mode != "token":
        raise ClusterConfigError(
            f"{where}.authOptions.mode: Ray token authentication is required (got {mode!r}); "
            "set authOptions: {mode: token, secretName: ...}"
        )
    if spec.get("headGroupSpec", {}).get("serviceType", "ClusterIP") != "ClusterIP" or spec.get(
        "headGroupSpec", {}).get("enableIngress"):
        raise ClusterConfigError(f"{where}.headGroupSpec: the head service must stay ClusterIP, without ingress")
    if spec.get("enableInTreeAutoscaling"):
        # The operator adds the autoscaler container with this securityContext.
        head_pod_sc = spec["headGroupSpec"]["template"].get("spec", {}).get("securityContext") or {}
        _check_restricted(f"{where}.autoscalerOptions", (spec.get("autoscalerOptions") or {}).get(
            "securityContext"), head_pod_sc)


def check_kuberay_security(paths: list[str | Path]) -> list[str]:
    """Check what cluster/README.md's "Security" section promises, over a set of manifests.

    - Ray token authentication on every RayCluster and RayJob cluster, the head service
      ClusterIP without ingress;
    - every container (and the autoscaler sidecar, and a RayJob's submitter, which must then
      be spelled out) restricted: runAsNonRoot, no privilege escalation, capabilities dropped,
      read-only root file system, seccomp RuntimeDefault; no ``pip install`` at start;
    - no ``mlflow server`` beyond loopback without ``--app-name basic-auth``; Services ClusterIP;
    - the NetworkPolicies, evaluated for every pod the manifests create: the Ray head's ports
      :data:`RAY_HEAD_PORTS` and MLflow's port admit only the head's clients (Ray pods; a
      RayJob's submitter and the KubeRay operator on :data:`RAY_JOB_API_PORT`), not any other
      pod of the namespace or of another namespace, and those clients are admitted.

    Args:
        paths: the manifest files applied together into one namespace.

    Returns:
        One line per admitted (source, target, port) of the head and MLflow, for reports.

    Raises:
        ClusterConfigError: naming the file, object, field and the rule that failed.
    """
    pods: list[_Pod] = []
    policies: list[dict[str, Any]] = []
    for path in map(Path, paths):
        for index, obj in enumerate(_load_yaml_documents(path)):
            if not isinstance(obj, dict) or "kind" not in obj:
                raise ClusterConfigError(f"{path}: document {index}: needs apiVersion and kind")
            name = (obj.get("metadata") or {}).get("name", "?")
            where = f"{path}: {obj['kind']}/{name}"
            spec = obj.get("spec", {})
            if obj["kind"] == "NetworkPolicy":
                policies.append(obj)
            elif obj["kind"] == "Service" and spec.get("type", "ClusterIP") != "ClusterIP":
                raise ClusterConfigError(f"{where}: spec.type must be ClusterIP (got {spec['type']!r})")
            elif obj["kind"] == "RayCluster":
                _check_ray_auth(f"{where}: spec", spec)
            elif obj["kind"] == "RayJob":
                if "rayClusterSpec" in spec:
                    _check_ray_auth(f"{where}: spec.rayClusterSpec", spec["rayClusterSpec"])
                mode = spec.get("submissionMode", "K8sJobMode")
                if mode == "SidecarMode" or (mode == "K8sJobMode" and "submitterPodTemplate" not in spec):
                    raise ClusterConfigError(
                        f"{where}: spec.submitterPodTemplate: the operator's default submitter has no "
                        "securityContext; spell the submitter pod out (K8sJobMode)"
                    )
            pods.extend(_manifest_pods(where, obj))
    for pod in pods:
        pod_sc = pod.spec.get("securityContext") or {}
        for kind in ("initContainers", "containers"):
            for i, container in enumerate(pod.spec.get(kind, [])):
                cwhere = f"{pod.where}.spec.{kind}[{i}]"
                _check_restricted(cwhere, container.get("securityContext"), pod_sc)
                argv = [*container.get("command", []), *container.get("args", [])]
                if "pip install" in " ".join(argv):
                    raise ClusterConfigError(f"{cwhere}: installs packages at start (`pip install`); build an image")
                if "mlflow" in container.get("image", "") and argv[:2] != ["mlflow", "server"]:
                    argv = ["mlflow", "server", *argv]  # the MLflow image's entrypoint
                env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
                check_mlflow_server_command(argv, f"{cwhere}: ", env)
    return _check_network_policies(pods, policies)


def _check_network_policies(pods: list[_Pod], policies: list[dict[str, Any]]) -> list[str]:
    """Every pod, a stranger in the namespace, one in another namespace and the operator, tried
    against the head's ports and MLflow's: admitted exactly when it is one of their clients."""
    ray_pods = [p for p in pods if p.labels.get("ray.io/is-ray-node") == "yes"]
    ray_names = {p.where for p in ray_pods}
    has_submitter = any(p.role == "submitter" for p in pods)
    operator = _Source("the KubeRay operator", dict(KUBERAY_OPERATOR_LABELS),
                       {"kubernetes.io/metadata.name": KUBERAY_OPERATOR_NAMESPACE})
    sources = [
        _Source("any other pod of the namespace", {}, {}),
        _Source("a pod of another namespace", {}, {"kubernetes.io/metadata.name": "elsewhere"}),
        *(_Source(p.where, p.labels, {}) for p in pods),
        operator,
    ]
    roles = {p.where: p.role for p in pods}

    def verdict(target: _Pod, source: _Source, port: int) -> str:
        """'must', 'may' or 'never' be admitted."""
        if source.name in ray_names:
            return "must"
        if target.role == "head" and port == RAY_JOB_API_PORT:
            if roles.get(source.name) == "submitter":
                return "must"
            if source is operator:
                return "must" if has_submitter else "may"
        return "never"

    targets = [(p, RAY_HEAD_PORTS) for p in pods if p.role == "head"] + [
        (p, (MLFLOW_PORT,)) for p in pods if any("mlflow" in c.get("image", "") for c in p.spec.get("containers", []))
    ]
    admitted = []
    for target, ports in targets:
        for port in ports:
            for source in sources:
                if source.name == target.where:
                    continue
                ok, want = network_policy_admits(policies, target, source, port), verdict(target, source, port)
                if ok and want == "never":
                    raise ClusterConfigError(
                        f"{target.where}: port {port} admits {source.name}; the NetworkPolicies must admit "
                        f"only the head's clients (Ray pods; on {RAY_JOB_API_PORT} a RayJob's submitter and "
                        "the KubeRay operator) and MLflow's (Ray pods)"
                    )
                if want == "must" and not ok:
                    raise ClusterConfigError(
                        f"{target.where}: port {port} does not admit {source.name}, which needs it"
                    )
                if ok:
                    admitted.append(f"{source.name} -> {target.where}:{port}")
    # Ray pods reach each other on the ports Ray picks at run time (worker ports, object managers).
    for target in ray_pods:
        for source in ray_pods:
            if source is not target and not network_policy_admits(
                policies, target, _Source(source.where, source.labels, {}), 10002
            ):
                raise ClusterConfigError(
                    f"{target.where}: Ray's run-time ports (e.g. 10002) do not admit {source.where}; "
                    "Ray pods must reach each other on every port"
                )
    return admitted


def check_launcher_security(path: str | Path) -> None:
    """Ray token authentication and a loopback dashboard in a ``ray up`` config.

    The start commands of head and workers must export ``RAY_AUTH_MODE=token`` after sourcing
    the environment file (so the file cannot turn it off), refuse an empty ``RAY_AUTH_TOKEN``,
    and the head's dashboard must listen on 127.0.0.1.

    Raises:
        ClusterConfigError: naming the file, the key and what is missing.
    """
    path = Path(path)
    config = _load_yaml_documents(path)[0]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        command = " ".join(config.get(key) or [])
        source, export = command.find(". ~/zosam.env"), command.find("export RAY_AUTH_MODE=token")
        if export < 0 or export < source:
            raise ClusterConfigError(
                f"{path}: {key}: needs `export RAY_AUTH_MODE=token` after sourcing ~/zosam.env"
            )
        if "${RAY_AUTH_TOKEN:?" not in command:
            raise ClusterConfigError(f'{path}: {key}: needs the guard `: "${{RAY_AUTH_TOKEN:?...}}"`')
        if "RAY_AUTH_MODE=disabled" in command:
            raise ClusterConfigError(f"{path}: {key}: RAY_AUTH_MODE=disabled")
    head = " ".join(config.get("head_start_ray_commands") or [])
    if not any(f"--dashboard-host={h}" in head for h in _LOOPBACK_HOSTS):
        raise ClusterConfigError(f"{path}: head_start_ray_commands: `ray start --head` needs "
                                 "--dashboard-host=127.0.0.1 (reach it through `ray dashboard`)")


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
