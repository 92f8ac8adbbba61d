"""What every cluster check shares: the error type, YAML reading, field paths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

# Kubernetes minor version the manifests are checked against (kubernetes-validate ships
# schemas up to 1.37; managed clusters of 2026 run 1.33 or newer).
KUBERNETES_VERSION = "1.33"


class ClusterConfigError(ValueError):
    """A cluster config or manifest failed validation; the message names file and field."""


def field_path(parts: Iterator[Any] | list[Any]) -> str:
    """Dotted path of a JSON-schema error location, list indices as ``[i]``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def load_yaml_documents(path: Path) -> list[Any]:
    """All non-empty YAML documents of ``path``; a parse error names the file."""
    try:
        return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except yaml.YAMLError as err:
        raise ClusterConfigError(f"{path}: not valid YAML: {err}") from None


#: Host names that keep a server on the machine itself.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
