"""``zosam demo`` (what ``make demo`` runs): the quick sweep, ``tune/quick.yaml``.

The sweep trains on the JPEG copy of CIFAR-10 (``$ZOSAM_CIFAR10_JPEG``, else
``../shared/data/cifar10-jpeg.tar.gz`` beside the checkout). A checkout without that
archive still gets a real demo: the same sweep (same model, optimizer, search space,
scheduler and trial count) on scikit-learn's bundled digits, after one line on stderr
saying where the archive is expected.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from zosam.console import eprint

# zosam/demo.py -> parents[1] is the repository root (an editable install, as the Makefile makes).
QUICK_SPEC = Path(__file__).resolve().parents[1] / "tune" / "quick.yaml"
# The same sweep on digits: all 1,797 images (its fixed 80/20 split), since the CIFAR subsets
# of tune/quick.yaml are larger than the set.
DIGITS_FALLBACK = ("base.data.name=digits", "base.data.train_subset=null", "base.data.test_subset=null")


def cifar10_jpeg_archive(overrides: Sequence[str] = ()) -> Path:
    """The archive the quick sweep would read: ``base.data.archive=`` among ``overrides``, else
    ``$ZOSAM_CIFAR10_JPEG``, else ``../shared/data/cifar10-jpeg.tar.gz``."""
    from zosam.data.config import default_archive

    given = [o.partition("=")[2] for o in overrides if o.startswith("base.data.archive=")]
    return Path(given[-1] if given else default_archive()).expanduser()


def fallback_overrides(overrides: Sequence[str] = ()) -> list[str]:
    """``[]`` when the CIFAR-10 JPEG archive is there (or the user chose the data set);
    otherwise the overrides that run the same sweep on digits, after saying so on stderr."""
    if any(o.startswith("base.data.name=") for o in overrides):
        return []
    archive = cifar10_jpeg_archive(overrides)
    if archive.is_file():
        return []
    eprint(f"zosam demo: no CIFAR-10 JPEG archive at {archive} (set $ZOSAM_CIFAR10_JPEG, or put "
           f"cifar10-jpeg.tar.gz in ../shared/data beside the checkout); running the same sweep on "
           f"scikit-learn's bundled digits instead")
    return list(DIGITS_FALLBACK)


def demo_overrides(overrides: Sequence[str] = (), *, stamp: str | None = None) -> list[str]:
    """The quick sweep's overrides: a new name per demo (each is its own sweep, so it can be
    rerun), the digits fallback when needed, then the user's own (which win)."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    return [f"name=quick-{stamp}", *fallback_overrides(overrides), *overrides]
