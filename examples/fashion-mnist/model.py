"""The reference component's network: a small CNN for 28x28 greyscale Fashion-MNIST.

Pure torch, no flywheel import: `features` maps a (N, 1, 28, 28) batch to the (N, 128) embedding the
monitor compares (the name `train.py` gives `log_model`), `head` maps it to the 10 class logits.
The recipe it is trained with (epochs, batch size, learning rate) is in RECIPE.md; the measured
accuracy and training time are in benchmarks/README.md (benchmarks/reference_component.py).
"""

from __future__ import annotations

from torch import nn


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _conv_bn_pool(cin: int, cout: int) -> list[nn.Module]:
    # Pool before the ReLU: max and ReLU commute, so this is conv-BN-ReLU-pool to the bit, but the
    # ReLU (and its backward, a memory-bound pass) runs on a quarter of the values.
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.MaxPool2d(2),
            nn.ReLU(inplace=True)]


class FashionCNN(nn.Module):
    """426,234 parameters, trained with RECIPE.md (5 epochs, batch 128, one-cycle AdamW at 5e-3, no
    augmentation); its measured accuracy and training time are in benchmarks/README.md.

    Where a 2-core CPU's time goes is the 28x28 stage: the convolution itself is cheap (one input
    channel), but batch norm, ReLU and pooling there are memory-bound passes over N x C x 784
    values, forward and backward (hence the ReLU after the pooling, on a quarter of them). So the
    channels grow as the map shrinks: 16 at 28x28, 32 at
    14x14, 64 at 7x7, where a convolution is cheapest per weight. The 7x7x64 map is flattened (not
    globally pooled: where on the garment a feature sits matters) into the 128-d embedding.

    Measured on this 2-core CPU next to the old 24/48 small-cnn (RECIPE.md): a step costs 0.5-0.6x
    its wall time on two threads, 0.70-0.73x its CPU time on one, so the recipe's 5 epochs cost
    ~1.0-1.2x its 3. No dropout: a run this short underfits, and the dropout mask alone was ~10% of
    a CPU step. Tried and worse in the same time: a pixel-unshuffle stem that skips 28x28 (0.6x per
    epoch, but 91.5-92.0%: the first 2x downsampling loses the texture that tells shirt from
    T-shirt); wider 7x7 stages; left-right flips and label smoothing (-0.1 to -0.4 pt).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_pool(1, 16),  # 28 → 14
            *_conv_bn_pool(16, 32),  # 14 → 7
            *_conv_bn(32, 64),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
