"""Is the CPU training step waiting on data? Loader time per batch vs one SGD step.

Times, on the same batches: loading the dataset (from the decoded cache, and optionally
the one-off decode of the JPEG archive), one augmented training batch from
``BatchLoader`` (permutation, crop + flip, normalisation), one evaluation batch, and one
SGD step of the model (forward, backward, update) on that batch. The summary states the
loader's share of a training step: ``load / (load + step)``.

``--deit``: the ImageNet input pipeline instead, on real JPEGs: CIFAR-10 images from the
JPEG archive upscaled to ``--jpeg-size`` (ImageNet's most common size, 500x375, by
default) and saved as JPEG quality 90 in an ImageFolder tree, read through the run's
``DatasetLoader`` with DeiT's training transform (decode, random-resized crop to 224,
flip, RandAugment, normalise, random erasing). It prints images/s with 0, 1, 2, ...
workers and per worker, plus the single-process split decode / transform per image.
How many workers one GPU needs: its training images/s over the per-worker rate.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from zosam.bench import emit
from zosam.cliargs import add_tracking_uri
from zosam.data import DataConfig, load_dataset, make_loaders
from zosam.models import create_model


def _time_batches(loader, n: int) -> list[float]:
    """Seconds per batch for ``n`` batches (epochs chained if the loader is shorter)."""
    times: list[float] = []
    epoch = 0
    while len(times) < n:
        loader.set_epoch(epoch)
        it = iter(loader)
        while len(times) < n:
            t = time.perf_counter()
            try:
                next(it)
            except StopIteration:
                break
            times.append(time.perf_counter() - t)
        epoch += 1
    return times


def _jpeg_tree(root: Path, archive: str, count: int, size: tuple[int, int], grain: float = 0.0) -> int:
    """``count`` JPEGs under ``root/<class>/``: archive images upscaled (bicubic) to ``size``, plus
    Gaussian grain of ``grain`` pixel levels (seeded): upscaled images are smooth and compress
    far better than photographs, and JPEG decoding time grows with the file size."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    written = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if written >= count:
                break
            if not (member.isfile() and member.name.startswith("train/") and member.name.endswith(".jpg")):
                continue
            cls = member.name.split("/")[1]
            img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
            (root / cls).mkdir(parents=True, exist_ok=True)
            img = img.resize(size, Image.BICUBIC)
            if grain:
                noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, grain, (size[1], size[0], 3))
                img = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
            img.save(root / cls / f"{written:05d}.jpg", quality=90)
            written += 1
    return written


def deit_pipeline(args: argparse.Namespace) -> dict:
    """images/s of DeiT's training input pipeline with each worker count in ``args.workers``."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    from zosam.data import DatasetLoader, default_archive
    from zosam.data.imagenet import imagenet_transforms

    w, h = (int(v) for v in args.jpeg_size.lower().split("x"))
    train_tf, _ = imagenet_transforms(args.image_size, augment=True, recipe="deit")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n = _jpeg_tree(Path(tmp), args.archive or default_archive(), args.jpeg_count, (w, h), args.grain)
        data = ImageFolder(tmp, transform=train_tf)
        mean_kb = sum(Path(p).stat().st_size for p, _ in data.samples) / n / 1024
        # One process, image by image: where the time goes. CPU seconds (process_time) as well
        # as wall seconds: on a shared machine the CPU time is what a dedicated core would take.
        wall, cpu = {"decode": 0.0, "transform": 0.0}, {"decode": 0.0, "transform": 0.0}
        k = min(n, 128)
        for path, _ in data.samples[:k]:
            for part in ("decode", "transform"):
                t, c = time.perf_counter(), time.process_time()
                if part == "decode":
                    img = Image.open(path).convert("RGB")
                else:
                    train_tf(img)
                wall[part] += time.perf_counter() - t
                cpu[part] += time.process_time() - c
        for part, label in (("decode", "decode (1 process)"), ("transform", "DeiT transform (1 process)")):
            rows.append({"what": label, "ms_per_image": 1e3 * wall[part] / k, "cpu_ms_per_image": 1e3 * cpu[part] / k,
                         "images_per_s": k / wall[part], "images_per_cpu_s": k / cpu[part]})
        for workers in args.workers:
            loader = DatasetLoader(data, args.batch_size, train=True, seed=0, num_workers=workers)
            it = iter(loader)
            next(it)  # warm-up: worker start and the first batch
            kids = resource.getrusage(resource.RUSAGE_CHILDREN)
            t, c, seen = time.perf_counter(), time.process_time(), 0
            for _ in range(args.batches):
                try:
                    seen += len(next(it)[1])
                except StopIteration:
                    break
            elapsed, main_cpu = time.perf_counter() - t, time.process_time() - c
            del it  # joins the workers, so their CPU time is counted below
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            # Worker CPU includes their start and the warm-up batch: a slight overestimate.
            worker_cpu = (after.ru_utime + after.ru_stime) - (kids.ru_utime + kids.ru_stime)
            rate = seen / elapsed
            rows.append({"what": f"DatasetLoader, {workers} workers", "workers": workers, "images_per_s": rate,
                         "images_per_s_per_worker": rate / max(workers, 1),
                         "images_per_cpu_s": seen / (main_cpu + worker_cpu)})
    summary = {"jpeg_size": f"{w}x{h}", "grain": args.grain, "jpeg_kb_mean": mean_kb, "images": n,
               "image_size": args.image_size, "batch_size": args.batch_size, "torch_threads": torch.get_num_threads()}
    return emit("data_speed_deit", rows, summary, mlflow_uri=args.mlflow_uri,
                columns=["what", "ms_per_image", "cpu_ms_per_image", "images_per_s", "images_per_s_per_worker",
                         "images_per_cpu_s"])


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="zosam bench data-speed", description=__doc__)
    p.add_argument("--dataset", default="cifar10-jpeg")
    p.add_argument("--archive", default=None, help="JPEG archive (default: data default)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=50, help="loader batches to time")
    p.add_argument("--steps", type=int, default=10, help="SGD steps to time (after 2 warm-up)")
    p.add_argument("--model", default="resnet32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--decode", action="store_true",
                   help="also time the one-off decode of the archive (into a temporary cache)")
    add_tracking_uri(p, "--mlflow-uri", dest="mlflow_uri", help="also log to this MLflow tracking URI")
    p.add_argument("--deit", action="store_true", help="time DeiT's ImageNet input pipeline on JPEGs instead")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="--deit: DataLoader worker counts")
    p.add_argument("--jpeg-size", default="500x375", help="--deit: JPEG size WxH (ImageNet's most common)")
    p.add_argument("--jpeg-count", type=int, default=512, help="--deit: JPEGs written")
    p.add_argument("--image-size", type=int, default=224, help="--deit: crop size")
    p.add_argument("--grain", type=float, default=0.0,
                   help="--deit: Gaussian grain in pixel levels (about 6 gives ImageNet's ~110 KB per 500x375 file)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deit:
        return deit_pipeline(args)

    overrides = {"archive": args.archive} if args.archive else {}
    cfg = DataConfig.from_dict({"name": args.dataset, "batch_size": args.batch_size,
                                "eval_batch_size": args.batch_size, **overrides})
    rows = []
    if args.decode and args.dataset == "cifar10-jpeg":
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            load_dataset(DataConfig.from_dict({**cfg.to_dict(), "cache_dir": tmp}))
            rows.append({"what": "decode archive (once)", "seconds": time.perf_counter() - t})
    load_dataset(cfg)  # make sure the cache exists before timing a cached load
    t = time.perf_counter()
    bundle = load_dataset(cfg)
    rows.append({"what": "load dataset (cached)", "seconds": time.perf_counter() - t})

    train, test = make_loaders(bundle, cfg, seed=0)
    t_train = statistics.median(_time_batches(train, args.batches))
    t_eval = statistics.median(_time_batches(test, min(args.batches, len(test))))

    model = create_model(args.model, num_classes=bundle.num_classes)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    train.set_epoch(0)
    x, y = next(iter(train))
    step_times = []
    for i in range(args.steps + 2):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 2:  # warm-up steps excluded
            step_times.append(time.perf_counter() - t)
    t_step = statistics.median(step_times)
    bs = args.batch_size
    rows += [
        {"what": f"train batch {bs} (augment)", "seconds": t_train, "images_per_s": bs / t_train},
        {"what": f"eval batch {bs}", "seconds": t_eval, "images_per_s": bs / t_eval},
        {"what": f"{args.model} SGD step, batch {bs}", "seconds": t_step,
         "images_per_s": bs / t_step},
    ]
    summary = {
        "dataset": bundle.label,
        "batch_size": bs,
        "model": args.model,
        "load_s_per_batch": t_train,
        "step_s": t_step,
        "load_fraction_of_step": t_train / (t_train + t_step),
    }
    return emit("data_speed", rows, summary, mlflow_uri=args.mlflow_uri,
                columns=["what", "seconds", "images_per_s"])


if __name__ == "__main__":
    main()
