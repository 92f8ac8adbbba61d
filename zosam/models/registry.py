"""``MODELS``: model name -> constructor ``(num_classes, **kwargs) -> nn.Module``.

Apart from the package's ``__init__`` so that the model modules can register themselves
without importing the package that imports them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from zosam.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model. ``kwargs`` are passed to the model's constructor.

    Raises:
        ValueError: unknown ``name`` (the message lists the registered models).
    """
    return MODELS.get(name)(num_classes=num_classes, **kwargs)
