"""NetworkPolicies, evaluated: which pod may reach which port of the Ray head and of MLflow."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from zosam_cluster.common import ClusterConfigError
from zosam_cluster.pods import (
    KUBERAY_OPERATOR_LABELS,
    KUBERAY_OPERATOR_NAMESPACE,
    MLFLOW_PORT,
    RAY_HEAD_PORTS,
    RAY_JOB_API_PORT,
    Pod,
)


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


def network_policy_admits(policies: list[Mapping[str, Any]], target: Pod, source: _Source, port: int) -> bool:
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


def check_network_policies(pods: list[Pod], policies: list[dict[str, Any]]) -> list[str]:
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

    def verdict(target: Pod, source: _Source, port: int) -> str:
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
