"""ResNet-50: a CIFAR variant (3x3 stem, no max-pool) and torchvision's ImageNet model.

The CIFAR variant keeps ImageNet ResNet-50's bottleneck stages (3, 4, 6, 3 blocks of
widths 64..512, expansion 4, about 23.5 M weights) but replaces the 7x7/2 stem and the
max-pool by one 3x3/1 convolution, so 32x32 inputs keep 32x32 maps in the first stage.
"""

from __future__ import annotations

from torch import Tensor, nn

from zosam.models.registry import MODELS
from zosam.validate import choice


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand; projection shortcut if needed."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride, bias=False),
                                          nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn1(self.conv1(x)).relu()
        y = self.bn2(self.conv2(y)).relu()
        y = self.bn3(self.conv3(y))
        return (y + self.shortcut(x)).relu()


class CifarResNet50(nn.Module):
    """Bottleneck ResNet-50 for small images (3x3 stem, no max-pool)."""

    def __init__(self, num_classes: int, in_channels: int = 3,
                 blocks: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, in_planes = [], 64
        for i, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
            layers = []
            for j in range(n):
                layers.append(Bottleneck(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn1(self.conv1(x)).relu()
        y = self.layer4(self.layer3(self.layer2(self.layer1(y))))
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


@MODELS.register("resnet50")
def resnet50(num_classes: int = 10, variant: str = "cifar", in_channels: int = 3) -> nn.Module:
    """ResNet-50: ``variant="cifar"`` (3x3 stem) or ``"imagenet"`` (torchvision, no weights)."""
    choice("model.variant", variant, ("cifar", "imagenet"))
    if variant == "cifar":
        return CifarResNet50(num_classes, in_channels=in_channels)
    if in_channels != 3:
        raise ValueError(f"model.in_channels={in_channels!r} is invalid; the imagenet variant "
                         f"takes 3")
    from torchvision.models import resnet50 as tv_resnet50  # heavy: import on use

    return tv_resnet50(weights=None, num_classes=num_classes)
