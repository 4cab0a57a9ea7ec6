"""The reference component's network: a small CNN for 28x28 greyscale Fashion-MNIST.

Pure torch, no flywheel import: `features` maps a (N, 1, 28, 28) batch to the (N, 128) embedding the
monitor compares (the name `train.py` gives `log_model`), `head` maps it to the 10 class logits.
"""

from __future__ import annotations

from torch import nn


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FashionCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(1, 24), nn.MaxPool2d(2),  # 28 → 14
            *_conv_bn(24, 48), nn.MaxPool2d(2),  # 14 → 7
            nn.Flatten(), nn.Dropout(0.2),
            nn.Linear(48 * 7 * 7, 128), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
