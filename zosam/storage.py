"""Where Ray keeps a sweep's state and checkpoints: a local path, or object storage.

``storage_path`` is a local directory or an object-store URI (``s3://bucket/prefix``,
``gs://...``). An S3-protocol store other than AWS (MinIO, Ceph, a test server on
loopback) is named by its endpoint: the sweep spec's ``storage_endpoint``, the CLI's
``--storage-endpoint``, else the AWS SDK's own variables ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` (so one setting serves boto3, MLflow and Ray). Credentials come
from the usual AWS variables or files, never from the spec. On a cluster of several nodes
both the tracking store and ``storage_path`` must be reachable from every node
(:func:`check_multi_node_settings`).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from zosam.validate import ConfigError

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def check_endpoint(field: str, url: Any) -> str:
    """``url`` if it is ``http(s)://host[:port]`` (no path, query or credentials); else a ConfigError naming
    ``field``."""
    parts = urlsplit(url) if isinstance(url, str) else None
    try:
        port_ok = parts is not None and (parts.port is None or 0 < parts.port < 65536)
    except ValueError:
        port_ok = False
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not port_ok
            or parts.path not in ("", "/") or parts.query or parts.fragment or parts.username):
        raise ConfigError(f"{field}={url!r} is invalid; must be an S3 endpoint URL http(s)://host[:port], "
                         "e.g. http://127.0.0.1:9000")
    return url.rstrip("/")


def resolve_endpoint(storage_path: str, explicit: str | None, field: str = "storage_endpoint") -> str | None:
    """The S3 endpoint to use for ``storage_path``: ``explicit``, else the AWS variables, else None (AWS).

    Raises:
        ConfigError: an explicit endpoint for a storage path that is not ``s3://``, or an
            endpoint that is not an ``http(s)://host[:port]`` URL (the message names its source).
    """
    if explicit is not None:
        if not storage_path.startswith("s3://"):
            raise ConfigError(f"{field}={explicit!r} needs an s3:// storage_path, got {storage_path!r}")
        return check_endpoint(field, explicit)
    if not storage_path.startswith("s3://"):
        return None
    for var in ENDPOINT_ENV:
        if os.environ.get(var):
            return check_endpoint(var, os.environ[var])
    return None


def filesystem(storage_path: str, endpoint: str | None):
    """A pyarrow filesystem for Ray's ``storage_filesystem``, or None (Ray's default for the URI).

    With an endpoint, an ``S3FileSystem`` talking to it; the path given to Ray is then
    ``bucket/prefix`` (see :func:`ray_path`).
    """
    if endpoint is None:
        return None
    from pyarrow.fs import S3FileSystem

    parts = urlsplit(endpoint)
    return S3FileSystem(endpoint_override=parts.netloc, scheme=parts.scheme,
                        region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1")


def ray_path(storage_path: str, endpoint: str | None) -> str:
    """The path Ray gets alongside :func:`filesystem`: without the scheme when a filesystem is given."""
    return storage_path.removeprefix("s3://") if endpoint else storage_path


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
        ConfigError: naming the setting, the bad value and what a cluster needs.
    """
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
