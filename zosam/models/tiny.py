"""Small models for tests and quick runs: a two-block CNN and an MLP."""

from __future__ import annotations

from torch import Tensor, nn

from zosam.models import MODELS
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
