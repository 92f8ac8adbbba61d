"""What cluster/README.md's "Security" section promises: Ray token auth, restricted containers,
no unauthenticated MLflow beyond loopback, ClusterIP services, NetworkPolicies."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zosam_cluster.common import LOOPBACK_HOSTS, ClusterConfigError, load_yaml_documents
from zosam_cluster.netpol import check_network_policies
from zosam_cluster.pods import Pod, manifest_pods

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
        if host not in LOOPBACK_HOSTS and opts.get("--app-name") != "basic-auth":
            raise ClusterConfigError(
                f"{where}`mlflow server` listens on {host!r} without authentication: add "
                f"`--app-name basic-auth` (MLflow's basic-auth app) or bind one of "
                f"{', '.join(LOOPBACK_HOSTS)} behind an authenticating proxy"
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
    pods: list[Pod] = []
    policies: list[dict[str, Any]] = []
    for path in map(Path, paths):
        for index, obj in enumerate(load_yaml_documents(path)):
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
            pods.extend(manifest_pods(where, obj))
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
    return check_network_policies(pods, policies)
