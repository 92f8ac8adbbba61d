"""CIFAR-10/100 from the official python pickles, and CIFAR-10 from the JPEG archive.

The JPEG archive (``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``) is decoded once
into a uint8 ``.npz`` in the cache directory, keyed by the archive's sha256; later loads
read the array (well under a second) instead of decoding 60,000 JPEGs (about 7 s).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from zosam.data.config import DataConfig
from zosam.data.registry import DATASETS, DataBundle, TensorSplit

# Per-channel mean and std of the training split in [0, 1] units. The std is the true
# pixel std (not the widespread 0.2023/0.1994/0.2010, which is a per-image average).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# Measured on the decoded JPEG copy's 50,000 training images (JPEG lowers the std a bit).
CIFAR10_JPEG_MEAN = (0.4913, 0.4821, 0.4465)
CIFAR10_JPEG_STD = (0.2452, 0.2428, 0.2606)

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]

_OFFICIAL = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85"),
}


def _missing_official(name: str, data_dir: str | None) -> FileNotFoundError:
    folder, archive, md5 = _OFFICIAL[name]
    return FileNotFoundError(
        f"{name}: no {folder}/ under data.data_dir={data_dir!r}. Nothing is downloaded at run "
        f"time: fetch {archive} from https://www.cs.toronto.edu/~kriz/ (md5 {md5}), check it "
        f"with `md5sum {archive}`, and unpack it with `tar xzf {archive} -C <data_dir>`. "
        f"Without it, use data.name='cifar10-jpeg' (the JPEG copy shipped in ../shared/data)."
    )


def _official(cfg: DataConfig, name: str) -> tuple[TensorSplit, TensorSplit, list[str]]:
    """Read the official pickles with torchvision's reader (md5 checks, no download)."""
    folder = _OFFICIAL[name][0]
    if cfg.data_dir is None or not (Path(cfg.data_dir) / folder).is_dir():
        raise _missing_official(name, cfg.data_dir)
    from torchvision import datasets  # heavy: import on use

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    splits = []
    for train in (True, False):
        ds = cls(cfg.data_dir, train=train, download=False)
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        splits.append(TensorSplit(images, torch.as_tensor(ds.targets, dtype=torch.long)))
    return splits[0], splits[1], list(ds.classes)


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig) -> DataBundle:
    """Official CIFAR-10 (python pickles in ``data_dir/cifar-10-batches-py``)."""
    train, test, classes = _official(cfg, "cifar10")
    return DataBundle("cifar10", "CIFAR-10", train, test, 10, (3, 32, 32),
                      CIFAR10_MEAN, CIFAR10_STD, classes=classes)


@DATASETS.register("cifar100")
def cifar100(cfg: DataConfig) -> DataBundle:
    """Official CIFAR-100, fine labels (``data_dir/cifar-100-python``)."""
    train, test, classes = _official(cfg, "cifar100")
    return DataBundle("cifar100", "CIFAR-100", train, test, 100, (3, 32, 32),
                      CIFAR100_MEAN, CIFAR100_STD, classes=classes)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _decode(blob: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_jpeg_archive(archive: str | os.PathLike, processes: int = 2) -> dict[str, np.ndarray]:
    """Decode ``train/`` and ``test/`` of the archive into uint8 NCHW arrays and labels.

    Labels are the alphabetical index of the class folder (equal to CIFAR-10's order).
    Images are sorted by (class, file name) so the arrays do not depend on archive order.
    """
    blobs: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar:
            parts = m.name.strip("./").split("/")
            if m.isfile() and len(parts) == 3 and parts[0] in blobs:
                f = tar.extractfile(m)
                assert f is not None
                blobs[parts[0]].append((parts[1], parts[2], f.read()))
    classes = sorted({c for items in blobs.values() for c, _, _ in items})
    if not blobs["train"] or not blobs["test"]:
        raise ValueError(f"{archive}: expected train/<class>/*.jpg and test/<class>/*.jpg")
    out: dict[str, np.ndarray] = {"classes": np.array(classes)}
    for split, items in blobs.items():
        items.sort(key=lambda t: (t[0], t[1]))
        data = [b for _, _, b in items]
        if processes > 1 and len(data) > 2000:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(processes) as pool:
                imgs = pool.map(_decode, data, chunksize=500)
        else:
            imgs = [_decode(b) for b in data]
        out[f"x_{split}"] = np.ascontiguousarray(np.stack(imgs).transpose(0, 3, 1, 2))
        out[f"y_{split}"] = np.array([classes.index(c) for c, _, _ in items], dtype=np.int64)
    return out


def cached_jpeg_arrays(archive: str | os.PathLike, cache_dir: str | os.PathLike
                       ) -> tuple[dict[str, np.ndarray], str]:
    """Decoded arrays of the archive, from the cache when present. Returns (arrays, sha256)."""
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(
            f"data.archive={str(archive)!r} does not exist. It is the CIFAR-10 JPEG archive "
            f"(../shared/data/cifar10-jpeg.tar.gz in the project's shared folder); point "
            f"data.archive or $ZOSAM_CIFAR10_JPEG at a copy."
        )
    sha = file_sha256(archive)
    cache = Path(cache_dir).expanduser() / f"cifar10-jpeg-{sha[:16]}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}, sha
    arrays = decode_jpeg_archive(archive)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: concurrent loaders (DDP ranks, trials) never read a partial file.
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared
        os.replace(tmp, cache)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return arrays, sha


@DATASETS.register("cifar10-jpeg")
def cifar10_jpeg(cfg: DataConfig) -> DataBundle:
    """CIFAR-10 re-encoded as JPEG (``cfg.archive``); label results "CIFAR-10 (JPEG copy)"."""
    arrays, sha = cached_jpeg_arrays(cfg.archive, cfg.cache_dir)
    train = TensorSplit(torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"]))
    test = TensorSplit(torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"]))
    classes = [str(c) for c in arrays["classes"]]
    return DataBundle("cifar10-jpeg", "CIFAR-10 (JPEG copy)", train, test, len(classes),
                      (3, 32, 32), CIFAR10_JPEG_MEAN, CIFAR10_JPEG_STD, classes=classes,
                      meta={"archive": str(cfg.archive), "archive_sha256": sha})
