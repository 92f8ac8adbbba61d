"""Model registry: ``create_model(name, num_classes, **kw)``.

Each model module registers its constructors with ``MODELS`` (``zosam.models.registry``);
importing this package imports them all (they are light: timm is imported only when a
DeiT is built).
"""

from zosam.models import resnet50, resnet_cifar, tiny, vit  # noqa: F401  (register models)
from zosam.models.registry import MODELS, create_model

__all__ = ["MODELS", "create_model"]
