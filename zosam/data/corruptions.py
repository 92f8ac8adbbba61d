"""Generate a CIFAR-10-C-style set offline (``generate_cifar10c``); ``zosam.data.cifar10c`` reads it.

Needs the ``robustness`` extra (imagecorruptions-imaug, OpenCV, scikit-image, SciPy),
imported only when a set is generated. The layout written is the official one (see
``zosam.data.cifar10c``) plus ``metadata.json`` with ``"generated": true``, the package and
constants used, the severities and the seed, so readers label it "CIFAR-10-C-style
(generated)", never CIFAR-10-C.

Severity constants. imagecorruptions-imaug implements ImageNet-C, whose constants are
harsher than those of CIFAR-10-C (``make_cifar_c.py`` in hendrycks/robustness uses milder
ones for 32x32 images). With ``constants="cifar"`` (default) every corruption in
``CIFAR_CONSTANTS`` (the 15 benchmark corruptions plus speckle_noise, gaussian_blur and
saturate) uses CIFAR-10-C's constants and formulas, re-implemented here on top of the
package's helpers (``disk`` kernel, ``_motion_blur`` - its ImageMagick-free motion blur -,
the numba pixel shuffle of glass blur, ``plasma_fractal`` and its frost images).
Differences from the official generator that remain: motion blur and snow use the
package's motion-blur kernel instead of ImageMagick's; frost picks among the package's
frost images (the official script used its own copies, which are the same six pictures);
random draws differ (their global RNG, our per-image seeds), so a generated set is not
bit-identical to the official one. ``spatter`` is not re-implemented: it always uses the
package at ImageNet-C constants, and ``constants="imagenet"`` uses the package for all.
The metadata records, per corruption, which constants were used.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from zosam.data.cifar10c import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS, GENERATED_LABEL, SEVERITIES
from zosam.extras import require
from zosam.validate import choice, in_range

# CIFAR-10-C's severity constants (make_cifar_c.py), one entry per severity 1..5.
CIFAR_CONSTANTS: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],  # noise std
    "shot_noise": [500, 250, 100, 75, 50],  # Poisson photon count at intensity 1
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],  # salt-and-pepper fraction
    "speckle_noise": [0.06, 0.10, 0.12, 0.16, 0.20],  # multiplicative noise std
    "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],  # sigma
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],  # radius, alias
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],  # radius, sigma
    "zoom_blur": [(1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)],
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],  # image, frost
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],  # strength, decay
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],  # added to HSV value
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],  # factor around the per-channel mean
    "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
                          (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],  # x image size
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],  # downscale factor
    "jpeg_compression": [80, 65, 58, 50, 40],  # quality
}


@contextlib.contextmanager
def _numpy_global_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global RNG for package code that uses it, then restore its state.

    imagecorruptions draws from ``np.random``; saving and restoring keeps the caller's
    global stream untouched.
    """
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.filters import gaussian

    return gaussian(x, sigma=sigma, channel_axis=-1 if x.ndim == 3 else None)


def _center_zoom(img: np.ndarray, factor: float) -> np.ndarray:
    """Zoom the centre by ``factor`` and trim back to the input size (centred)."""
    from scipy.ndimage import zoom

    h = img.shape[0]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    z = zoom(img[top:top + ch, top:top + ch], (factor, factor, 1), order=1)
    t = (z.shape[0] - h) // 2
    return z[t:t + h, t:t + h]


def _corrupt_cifar(x: np.ndarray, name: str, severity: int, rng: np.random.Generator,
                   seed: int) -> np.ndarray:
    """One HxWx3 uint8 image at CIFAR-10-C constants; returns float in [0, 255]."""
    # ic._motion_blur and ic._shuffle_pixels_njit_glass_blur are private: the package has no
    # public form taking CIFAR-10-C's constants. The version is pinned (pyproject.toml) and
    # tests/test_packaging.py::test_imagecorruptions_private_helpers fails first if they change.
    import cv2
    from imagecorruptions import corruptions as ic

    c = CIFAR_CONSTANTS[name][severity - 1]
    f = x.astype(np.float64) / 255.0
    h, w = x.shape[:2]
    if name == "gaussian_noise":
        out = f + rng.normal(scale=c, size=f.shape)
    elif name == "shot_noise":
        out = rng.poisson(f * c) / c
    elif name == "impulse_noise":  # salt and pepper on a fraction c of the values
        hit = rng.random(f.shape) < c
        salt = rng.random(f.shape) < 0.5
        out = np.where(hit, salt.astype(np.float64), f)
    elif name == "speckle_noise":
        out = f + f * rng.normal(scale=c, size=f.shape)
    elif name == "gaussian_blur":
        out = _gaussian(f, c)
    elif name == "defocus_blur":
        kernel = ic.disk(radius=c[0], alias_blur=c[1])
        out = np.stack([cv2.filter2D(f[..., d], -1, kernel) for d in range(3)], -1)
    elif name == "glass_blur":
        sigma, delta, iters = c
        g = np.uint8(_gaussian(f, sigma) * 255)
        g = ic._shuffle_pixels_njit_glass_blur(h, w, g, (sigma, delta, iters), seed)
        out = _gaussian(g / 255.0, sigma)
    elif name == "motion_blur":
        return np.clip(ic._motion_blur(x, radius=c[0], sigma=c[1],
                                       angle=rng.uniform(-45, 45)), 0, 255)
    elif name == "zoom_blur":
        top, step = c
        fs = f.astype(np.float32)
        zs = np.arange(1, top, step)
        out = (fs + sum(_center_zoom(fs, z) for z in zs)) / (len(zs) + 1)
    elif name == "snow":
        layer = rng.normal(loc=c[0], scale=c[1], size=(h, w))
        layer = _center_zoom(layer[..., None], c[2])[..., 0]
        layer[layer < c[3]] = 0
        layer = ic._motion_blur(np.clip(layer, 0, 1), radius=c[4], sigma=c[5],
                                angle=rng.uniform(-135, -45))
        layer = (np.round(layer * 255) / 255.0)[..., None]
        fs = f.astype(np.float32)
        gray = cv2.cvtColor(fs, cv2.COLOR_RGB2GRAY)[..., None]
        fs = c[6] * fs + (1 - c[6]) * np.maximum(fs, gray * 1.5 + 0.5)
        out = fs + layer + np.rot90(layer, k=2)
    elif name == "frost":
        import importlib.resources

        files = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"]
        ref = importlib.resources.files("imagecorruptions") / "frost" / files[rng.integers(5)]
        with importlib.resources.as_file(ref) as p:
            fr = cv2.imread(str(p))
        # As in CIFAR-10-C: frost pictures at 1/5 scale, a random crop of the image's size.
        fr = cv2.resize(fr, (0, 0), fx=0.2, fy=0.2)
        y0, x0 = rng.integers(0, fr.shape[0] - h), rng.integers(0, fr.shape[1] - w)
        fr = fr[y0:y0 + h, x0:x0 + w][..., ::-1]  # BGR -> RGB
        return np.clip(c[0] * x.astype(np.float64) + c[1] * fr, 0, 255)
    elif name == "fog":
        size = 1 << (max(h, w) - 1).bit_length()
        with _numpy_global_seed(seed):
            plasma = ic.plasma_fractal(mapsize=size, wibbledecay=c[1])[:h, :w, None]
        mx = f.max()
        out = (f + c[0] * plasma) * mx / (mx + c[0])
    elif name in ("brightness", "saturate"):
        from skimage.color import hsv2rgb, rgb2hsv

        hsv = rgb2hsv(f)
        if name == "brightness":
            hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        else:
            hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
        out = hsv2rgb(hsv)
    elif name == "contrast":
        m = f.mean(axis=(0, 1), keepdims=True)
        out = (f - m) * c + m
    elif name == "elastic_transform":
        out = _elastic(f.astype(np.float32), [v * h for v in c], rng)
    elif name in ("pixelate", "jpeg_compression"):
        import io

        from PIL import Image

        im = Image.fromarray(x)
        if name == "pixelate":
            small = im.resize((int(w * c), int(h * c)), Image.BOX)
            return np.asarray(small.resize((w, h), Image.BOX), dtype=np.float64)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=c)
        return np.asarray(Image.open(buf), dtype=np.float64)
    else:  # pragma: no cover - guarded by CIFAR_CONSTANTS
        raise KeyError(name)
    return np.clip(out, 0, 1) * 255


def _elastic(img: np.ndarray, c: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """CIFAR-10-C's elastic transform: a random affine warp, then a smooth random field.

    ``c = (alpha, sigma, affine)`` in pixels: displacement scale, smoothing of the field,
    and the maximum shift of the three affine control points.
    """
    import cv2
    from scipy.ndimage import map_coordinates

    alpha, sigma, affine = c
    hw = np.float32(img.shape[:2])
    centre, sq = hw // 2, min(img.shape[:2]) // 3
    pts1 = np.float32([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])
    pts2 = pts1 + rng.uniform(-affine, affine, size=pts1.shape).astype(np.float32)
    m = cv2.getAffineTransform(pts1, pts2)
    img = cv2.warpAffine(img, m, img.shape[1::-1], borderMode=cv2.BORDER_REFLECT_101)
    from skimage.filters import gaussian

    def field() -> np.ndarray:
        u = rng.uniform(-1, 1, size=img.shape[:2])
        # sigma 0 (severity 1) means no smoothing and alpha 0: a zero field.
        return (gaussian(u, sigma, mode="reflect", truncate=3) * alpha if sigma > 0
                else u * alpha).astype(np.float32)

    dx, dy = field()[..., None], field()[..., None]
    yy, xx, zz = np.meshgrid(np.arange(img.shape[0]), np.arange(img.shape[1]),
                             np.arange(img.shape[2]), indexing="ij")
    coords = (yy + dy).reshape(-1), (xx + dx).reshape(-1), zz.reshape(-1)
    return map_coordinates(img, coords, order=1, mode="reflect").reshape(img.shape)


def _corrupt_imagenet(x: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """The package's own implementation (ImageNet-C constants)."""
    from imagecorruptions import corrupt

    kwargs = {"seed": seed} if name in ("glass_blur", "impulse_noise") else {}
    with _numpy_global_seed(seed):
        return corrupt(x, severity=severity, corruption_name=name, **kwargs).astype(np.float64)


def corrupt_image(x: np.ndarray, name: str, severity: int, seed: int,
                  constants: str = "cifar") -> np.ndarray:
    """Corrupt one HxWx3 uint8 image; returns uint8. Deterministic in ``seed``."""
    require("robustness", "corrupting images (zosam.data.corrupt_image)")
    rng = np.random.default_rng(seed)
    if constants == "cifar" and name in CIFAR_CONSTANTS:
        out = _corrupt_cifar(x, name, severity, rng, seed)
    else:
        out = _corrupt_imagenet(x, name, severity, seed)
    return np.uint8(np.clip(out, 0, 255))


def constants_used(name: str, constants: str) -> str:
    """``"cifar10-c"`` or ``"imagenet-c"``: which constants a corruption gets."""
    return "cifar10-c" if constants == "cifar" and name in CIFAR_CONSTANTS else "imagenet-c"


def _image_seed(seed: int, corruption: str, severity: int, i: int) -> int:
    ss = np.random.SeedSequence([seed, ALL_CORRUPTIONS.index(corruption), severity, i])
    return int(ss.generate_state(1, np.uint32)[0])


def _corrupt_block(args: tuple) -> np.ndarray:
    images, name, severity, seed, start, constants = args
    return np.stack([
        corrupt_image(img, name, severity, _image_seed(seed, name, severity, start + k),
                      constants)
        for k, img in enumerate(images)
    ])


def generate_cifar10c(
    images_uint8: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    out_dir: str | os.PathLike,
    corruptions: Sequence[str] = BENCHMARK_CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    *,
    constants: str = "cifar",
    processes: int = 1,
    source: str = "",
) -> Path:
    """Write a CIFAR-10-C-style set from clean test images; returns ``out_dir``.

    Args:
        images_uint8: (N, 3, H, W) or (N, H, W, 3) uint8 clean images (H, W >= 32).
        labels: (N,) labels.
        out_dir: created if needed; ``<corruption>.npy``, ``labels.npy``, ``metadata.json``.
        corruptions: names from ``ALL_CORRUPTIONS``.
        severities: subset of 1..5; blocks are stacked in this order.
        seed: every image's randomness derives from ``(seed, corruption, severity, index)``.
        constants: ``"cifar"`` (CIFAR-10-C constants where re-implemented) or
            ``"imagenet"`` (the package's ImageNet-C constants for all).
        processes: worker processes (1: in-process).
        source: free text recorded in the metadata (e.g. ``"cifar10-jpeg test split"``).
    """
    require("robustness", "generating CIFAR-10-C (zosam.data.generate_cifar10c)")
    choice("constants", constants, ("cifar", "imagenet"))
    for c in corruptions:
        choice("corruption", c, ALL_CORRUPTIONS)
    for s in severities:
        in_range("severity", s, 1, 5, integer=True)
    x = images_uint8.numpy() if isinstance(images_uint8, torch.Tensor) else np.asarray(images_uint8)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W) or (N, H, W, C), "
                         f"got {x.dtype} {x.shape}")
    if x.shape[1] == 3 and x.shape[-1] != 3:
        x = x.transpose(0, 2, 3, 1)
    x = np.ascontiguousarray(x)
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = x.shape[0]
    chunk = max(1, -(-n // max(1, processes)))
    pool = None
    if processes > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(processes)
    try:
        for name in corruptions:
            blocks = []
            for s in severities:
                jobs = [(x[i:i + chunk], name, s, seed, i, constants) for i in range(0, n, chunk)]
                parts = pool.map(_corrupt_block, jobs) if pool else list(map(_corrupt_block, jobs))
                blocks.append(np.concatenate(parts))
            np.save(out / f"{name}.npy", np.concatenate(blocks))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    np.save(out / "labels.npy", np.tile(y.astype(np.uint8 if y.max() < 256 else np.int64),
                                         len(severities)))
    meta = {
        "generated": True,
        "label": GENERATED_LABEL,
        "package": "imagecorruptions-imaug",
        "package_version": importlib.metadata.version("imagecorruptions-imaug"),
        "constants": {c: constants_used(c, constants) for c in corruptions},
        "constants_values": {c: CIFAR_CONSTANTS[c] for c in corruptions
                             if constants_used(c, constants) == "cifar10-c"},
        "corruptions": list(corruptions),
        "severities": list(severities),
        "num_images": n,
        "seed": seed,
        "source": source,
        "generator": "zosam.data.corruptions.generate_cifar10c",
    }
    (out / "metadata.json").write_text(json.dumps(meta, indent=2))
    return out
