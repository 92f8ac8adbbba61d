"""Offline checks of the files under ``cluster/``: Ray launcher configs and Kubernetes manifests.

Deployment tooling, not part of the training runtime: it needs the ``cluster`` extra
(``kubernetes-validate``, ``jsonschema``) and nothing in ``zosam`` imports it. Modules:
``launcher`` (``ray up`` configs), ``manifests`` (schemas), ``pods`` (the pods manifests make),
``netpol`` (NetworkPolicies evaluated), ``security`` (what cluster/README.md promises).

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

from zosam_cluster.common import KUBERNETES_VERSION, ClusterConfigError
from zosam_cluster.launcher import check_launcher_security, validate_ray_cluster_config
from zosam_cluster.manifests import KUBERAY_CRD_FILES, KUBERAY_VERSION, load_kuberay_schemas, validate_k8s_manifests
from zosam_cluster.netpol import network_policy_admits
from zosam_cluster.security import check_kuberay_security, check_mlflow_server_command

__all__ = [
    "KUBERAY_CRD_FILES",
    "KUBERAY_VERSION",
    "KUBERNETES_VERSION",
    "ClusterConfigError",
    "check_kuberay_security",
    "check_launcher_security",
    "check_mlflow_server_command",
    "load_kuberay_schemas",
    "network_policy_admits",
    "validate_k8s_manifests",
    "validate_ray_cluster_config",
]
