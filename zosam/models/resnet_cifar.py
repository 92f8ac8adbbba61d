"""CIFAR ResNets (He et al. 2016, option-B shortcuts) as used by the sparse-training field.

ResNet-32 here is the 2x-wide variant of the sparse-training literature (stage widths
32/64/128, about 1.86 M weights); ``width=16`` gives the original 16/32/64 network.
"""

from __future__ import annotations

from torch import Tensor, nn

from zosam.models.registry import MODELS
from zosam.validate import in_range


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + self.shortcut(x)).relu()


class CifarResNet(nn.Module):
    """Three stages of n basic blocks each (depth = 6n + 2), for 32x32 inputs."""

    def __init__(self, depth: int, num_classes: int, width: int = 32, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth={depth} is invalid; must be 6n + 2 (20, 32, 44, 56, 110)")
        in_range("width", width, 1, integer=True)
        n = (depth - 2) // 6
        widths = [width, 2 * width, 4 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        out = self.layer3(self.layer2(self.layer1(out)))
        out = nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


@MODELS.register("resnet32")
def resnet32(num_classes: int = 10, width: int = 32, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-32; ``width=32`` (default) is the 2x-wide sparse-training variant."""
    return CifarResNet(32, num_classes, width=width, in_channels=in_channels)


@MODELS.register("resnet20")
def resnet20(num_classes: int = 10, width: int = 16, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-20 (original width 16): a small model for demos and tests."""
    return CifarResNet(20, num_classes, width=width, in_channels=in_channels)


@MODELS.register("resnet56")
def resnet56(num_classes: int = 10, width: int = 16, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-56 (original width 16): 9 blocks per stage, 173 parameter tensors, so
    per-tensor costs show their growth with depth next to ResNet-20 and ResNet-32."""
    return CifarResNet(56, num_classes, width=width, in_channels=in_channels)


@MODELS.register("resnet110")
def resnet110(num_classes: int = 10, width: int = 16, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-110 (original width 16): 18 blocks per stage, 335 parameter tensors."""
    return CifarResNet(110, num_classes, width=width, in_channels=in_channels)
