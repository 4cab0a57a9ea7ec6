"""The built-in trainer's architectures by name (`flywheel train --arch`, `flywheel archs`).

Training-time only: a logged model is loaded back from its exported files (flywheel.core.models),
never rebuilt from this list. Every architecture is a `FlywheelNet`: `features` maps an image batch
to the embedding the monitor compares (named to `log_model` as `embedding="features"`) and `head`
maps it to class logits; `forward` returns logits only.
"""

from __future__ import annotations

import torch
from torch import nn

from flywheel.core.errors import FlywheelError


class FlywheelNet(nn.Module):
    def __init__(self, features: nn.Module, embedding_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(embedding_dim, num_classes)
        self.embedding_dim = embedding_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(num_classes: int, in_channels: int = 1) -> FlywheelNet:
    """~0.31M-parameter CNN sized for a 2-core CPU: 91.4% on Fashion-MNIST after 3 epochs, 49 s of
    training measured here (batch 128, one-cycle AdamW at 3e-3).

    Pooling right after each conv keeps the 24→48 conv at 14×14 (a quarter of the cost at 28×28);
    the flattened 7×7 map keeps spatial layout that global pooling would throw away. 32/64 channels
    measured 2× slower per epoch on this CPU for +0.1 pt.
    """
    features = nn.Sequential(
        *_conv_bn(in_channels, 24), nn.MaxPool2d(2),  # 28 → 14
        *_conv_bn(24, 48), nn.MaxPool2d(2),  # 14 → 7
        nn.Flatten(), nn.Dropout(0.2),
        nn.Linear(48 * 7 * 7, 128), nn.ReLU(inplace=True),
    )
    return FlywheelNet(features, 128, num_classes)


def mlp(num_classes: int, in_channels: int = 1) -> FlywheelNet:
    """One hidden layer of 128 on the flattened 28×28 image: ~0.1M multiply-adds per image, ~25x
    fewer than small-cnn. The cheapest forward there is: for smoke runs, and for serving benchmarks
    that measure the handler rather than the network (`benchmarks/serving.py --arch mlp`)."""
    features = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, 128), nn.ReLU(inplace=True))
    return FlywheelNet(features, 128, num_classes)


def _torchvision_backbone(name: str, num_classes: int, in_channels: int) -> FlywheelNet:
    from flywheel.core.vision import import_torchvision

    tv = import_torchvision()
    if name == "resnet18":
        net = tv.models.resnet18(weights=None)
        # 28×28 inputs: a 3×3 stride-1 stem and no max-pool keep enough spatial resolution.
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return FlywheelNet(net, dim, num_classes)
    if name == "mobilenet_v3_small":
        net = tv.models.mobilenet_v3_small(weights=None)
        first = net.features[0][0]
        net.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, stride=1, padding=1, bias=False)
        dim = net.classifier[0].out_features  # keep the 1024-d hidden layer as the embedding
        net.classifier = nn.Sequential(*list(net.classifier.children())[:-1])
        return FlywheelNet(net, dim, num_classes)
    raise AssertionError(name)


ARCHITECTURES = {
    "small-cnn": "3 conv-BN blocks + global pool (CPU friendly, default)",
    "mlp": "one hidden layer on the flat image (cheapest forward: smoke runs, serving benchmarks)",
    "resnet18": "torchvision ResNet-18, weights=None, 3x3 stem for 28x28 (GPU nodes)",
    "mobilenet_v3_small": "torchvision MobileNetV3-Small, weights=None, stride-1 stem (GPU nodes)",
}


def build_model(name: str, num_classes: int, in_channels: int = 1) -> FlywheelNet:
    if name not in ARCHITECTURES:
        raise FlywheelError(f"unknown model {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
    if name == "small-cnn":
        return small_cnn(num_classes, in_channels)
    if name == "mlp":
        return mlp(num_classes, in_channels)
    return _torchvision_backbone(name, num_classes, in_channels)
