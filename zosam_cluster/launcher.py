"""``ray up`` cluster configs: Ray's own offline validation, token auth and a loopback dashboard."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema

from zosam_cluster.common import LOOPBACK_HOSTS, ClusterConfigError, field_path, load_yaml_documents


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
    # Private: Ray has no public validate-only call (ray.autoscaler.sdk.bootstrap_config also
    # contacts the cloud). tests/test_packaging.py::test_ray_launcher_private_helpers pins them.
    from ray.autoscaler._private.util import prepare_config, validate_config

    path = Path(path)
    docs = load_yaml_documents(path)
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
            f"{path}: {field_path(err.absolute_path)}: {err.message}"
        ) from None
    except (ValueError, KeyError, NotImplementedError, AssertionError) as err:
        raise ClusterConfigError(f"{path}: {err}") from None
    return prepared


def check_launcher_security(path: str | Path) -> None:
    """Ray token authentication and a loopback dashboard in a ``ray up`` config.

    The start commands of head and workers must export ``RAY_AUTH_MODE=token`` after sourcing
    the environment file (so the file cannot turn it off), refuse an empty ``RAY_AUTH_TOKEN``,
    and the head's dashboard must listen on 127.0.0.1.

    Raises:
        ClusterConfigError: naming the file, the key and what is missing.
    """
    path = Path(path)
    config = load_yaml_documents(path)[0]
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
    if not any(f"--dashboard-host={h}" in head for h in LOOPBACK_HOSTS):
        raise ClusterConfigError(f"{path}: head_start_ray_commands: `ray start --head` needs "
                                 "--dashboard-host=127.0.0.1 (reach it through `ray dashboard`)")
