"""Model registry: ``create_model(name, num_classes, **kw)``.

Each model module registers its constructors with ``MODELS``; importing this package
imports them all (they are light: timm is imported only when a DeiT is built).
"""

from __future__ import annotations

from torch import nn

from zosam.registry import Registry

MODELS: Registry = Registry("model")


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model. ``kwargs`` are passed to the model's constructor.

    Raises:
        ValueError: unknown ``name`` (the message lists the registered models).
    """
    return MODELS.get(name)(num_classes=num_classes, **kwargs)


from zosam.models import (  # noqa: E402,F401  (registers models)
    resnet50,
    resnet_cifar,
    tiny,
    vit,
)

__all__ = ["MODELS", "create_model"]
