"""Shared fixtures: small real data (never the whole CIFAR archive, never a download)."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from zosam.data.config import default_archive

PER_CLASS = 20  # images per class and split in the small JPEG archive


@pytest.fixture(scope="session")
def cifar_jpeg_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tar.gz with the layout of the CIFAR-10 JPEG archive and 20 real images per class
    and split (400 in all), copied from the real archive (``default_archive()``)."""
    src = Path(default_archive())
    out = tmp_path_factory.mktemp("cifar_jpeg") / "cifar10-jpeg-small.tar.gz"
    with tarfile.open(src, "r:gz") as tin, tarfile.open(out, "w:gz") as tout:
        for m in tin:
            parts = m.name.strip("./").split("/")
            if m.isfile() and len(parts) == 3 and int(parts[2].split(".")[0]) < PER_CLASS:
                data = tin.extractfile(m).read()
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
    return out


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test: on tiny tensors intra-op threads only add contention
    on a 2-core machine. Modules opt in with ``pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """An empty cache directory for decoded arrays (isolated from ~/.cache/zosam)."""
    d = tmp_path / "cache"
    d.mkdir()
    return d


# Every Ray that a test starts (tests/test_ray_integration.py, or a `zosam` subprocess that
# inherits this environment) binds all its listeners to 127.0.0.1 (shared/docs/stack.md).
# Set at import time, before any Ray can start.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
