"""Optional parts of zosam and the ``pip install 'zosam[extra]'`` that brings each.

The core install trains, sweeps, compares and reads CIFAR-10-C; the ``robustness`` extra
adds the CIFAR-10-C-style generator's image stack, ``cluster`` the deployment validators
(pyproject.toml lists them). Code that needs an extra calls :func:`require` first, so a
missing package ends in one clear message instead of a deep ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib

# The import names each extra provides (their distributions are in pyproject.toml).
EXTRAS: dict[str, tuple[str, ...]] = {
    "robustness": ("imagecorruptions", "cv2", "skimage"),
    "cluster": ("jsonschema", "kubernetes_validate"),
}


class MissingExtraError(ImportError):
    """An optional package is not installed; the message says which extra brings it."""


def require(extra: str, what: str) -> None:
    """Import the modules of ``extra``; raise :class:`MissingExtraError` naming ``what`` needs
    them and the command that installs them when one is missing."""
    missing = []
    for name in EXTRAS[extra]:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(f"{what} needs the optional '{extra}' packages ({', '.join(missing)} not "
                                f"installed): pip install 'zosam[{extra}]'")
