"""Small models for tests and quick runs: a two-block CNN, a LeNet-shaped CNN and an MLP."""

from __future__ import annotations

from torch import Tensor, nn

from zosam.models.registry import MODELS
from zosam.validate import in_range


class TinyCNN(nn.Module):
    """conv-[BN]-ReLU-pool, conv-[BN]-ReLU, global average pool, linear.

    With ``bn=False`` the network holds no BatchNorm at all (the convolutions get biases
    instead), so its output is per-sample: data-parallel and single-process runs agree
    exactly, which equivalence tests need.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16,
                 bn: bool = True) -> None:
        super().__init__()
        in_range("model.width", width, 1, integer=True)

        def block(cin: int, cout: int) -> list[nn.Module]:
            conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=not bn)
            return [conv, nn.BatchNorm2d(cout), nn.ReLU()] if bn else [conv, nn.ReLU()]

        self.features = nn.Sequential(*block(in_channels, width), nn.MaxPool2d(2),
                                      *block(width, 2 * width))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@MODELS.register("tiny_cnn")
def tiny_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 16,
             bn: bool = True) -> TinyCNN:
    """A two-convolution CNN (about 6 k weights at width 16); ``bn=False``: no BatchNorm."""
    return TinyCNN(num_classes, in_channels=in_channels, width=width, bn=bn)


@MODELS.register("mlp")
def mlp(num_classes: int = 10, in_features: int = 3 * 32 * 32,
        hidden: tuple[int, ...] | list[int] = (256,)) -> nn.Sequential:
    """Flatten, then ``Linear-ReLU`` per hidden width, then a linear classifier (no BN)."""
    in_range("model.in_features", in_features, 1, integer=True)
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_features
    for i, h in enumerate(hidden):
        in_range(f"model.hidden[{i}]", h, 1, integer=True)
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


class LeNet(nn.Module):
    """LeNet-5's shape: conv5-ReLU-pool, conv5-ReLU-pool, flatten, linear-ReLU, linear (no BN).

    Unlike ``TinyCNN`` (global average pooling, a 32-wide classifier) its flattened
    features give the classifier enough capacity to fit (memorise) the training labels
    of a small subset, which label-noise experiments need.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16, hidden: int = 256,
                 image_size: int = 32) -> None:
        super().__init__()
        in_range("model.width", width, 1, integer=True)
        in_range("model.hidden", hidden, 1, integer=True)
        in_range("model.image_size", image_size, 16, integer=True)
        side = ((image_size - 4) // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(2 * width * side * side, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@MODELS.register("lenet")
def lenet(num_classes: int = 10, in_channels: int = 3, width: int = 16, hidden: int = 256,
          image_size: int = 32) -> LeNet:
    """LeNet-5-shaped CNN (about 0.3 M weights at width 16 on 32x32 inputs) that can memorise."""
    return LeNet(num_classes, in_channels=in_channels, width=width, hidden=hidden, image_size=image_size)
