"""Shared fixtures: small real data (never the whole CIFAR archive, never a download)."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from databases import postgres_database

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


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite MLflow store per test module (creating its schema takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def store(shared_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The module's store as ``$MLFLOW_TRACKING_URI`` (what ``mlflow.search_runs`` and the
    CLI's default read), ``tmp_path`` as the working directory; the process-wide tracking
    URI is restored afterwards."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_db)
    return shared_db


@pytest.fixture
def experiment(request: pytest.FixtureRequest) -> str:
    """An experiment of this test's own in the module's store."""
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    return f"{module}-" + request.node.name.replace("[", "-").rstrip("]")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database of this test's own (:func:`postgres_database`)."""
    with postgres_database() as url:
        yield url


# -------------------------------------------------------------------------- the session's end
# After every test had passed and the summary was printed, the pytest process once died in
# its interpreter's teardown (a segfault in libstdc++ on a native thread; `make test` then
# fails; one of two full runs here). This process has hosted in-process Ray drivers, Ray's
# state-API gRPC clients, pyarrow's S3 client and MLflow, whose native threads can outlive
# Python's finalization. So the session shuts down what it knows of (an in-process Ray left
# connected) and ends with pytest's own exit status, skipping the interpreter's teardown.
# ZOSAM_TEST_FULL_TEARDOWN=1 keeps the ordinary exit (to chase the crash itself).
_EXIT_STATUS: list[int] = []


def pytest_configure(config: pytest.Config) -> None:
    config.add_cleanup(_exit_without_teardown)  # the first cleanup added is the last run


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    _EXIT_STATUS.append(int(exitstatus))


def _exit_without_teardown() -> None:
    if _EXIT_STATUS and not os.environ.get("ZOSAM_TEST_FULL_TEARDOWN"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
