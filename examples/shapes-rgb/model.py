"""The component's own network: a small residual CNN for 3 x 48 x 48 RGB images.

Defined only here (Flywheel has no copy of it): the registry holds the TorchScript/ONNX export
that `fc.train` logs, so serving, evaluation and the monitor never import this module.
`model.embed` is the submodule whose (N, 64) output the monitor uses as the drift embedding.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SIZE = 48


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    """Two 3x3 convolutions with an identity shortcut, then 2x2 max-pooling."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _conv(cin, cout)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                                                    nn.BatchNorm2d(cout))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.conv2(self.conv1(x)) + self.skip(x)))


class ShapesNet(nn.Module):
    """(N, 3, 48, 48) normalised RGB → (N, num_classes) logits; `embed` gives (N, embedding_dim).

    A strided stem halves the resolution first, so a training step costs ~8 M multiply-adds per
    image: two epochs of a few thousand images run in well under a minute on two CPU cores."""

    def __init__(self, num_classes: int, width: int = 16, embedding_dim: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),  # → 24x24
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(ResBlock(width, width * 2),               # → 12x12
                                    ResBlock(width * 2, width * 4),           # → 6x6
                                    ResBlock(width * 4, width * 4))           # → 3x3
        self.embed = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                                   nn.Linear(width * 4, embedding_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(embedding_dim, num_classes)
        self.embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(self.stages(self.stem(x))))
