"""Small networks for small images: the defaults for the embedded dataset and MNIST-sized data."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn


class ConvBlock(nn.Sequential):
    """Conv, BatchNorm, ReLU: a class of its own so that `trainer.fsdp.blocks` can name it."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SimpleCNN(nn.Module):
    """Two conv stages and global average pooling: works for any input size >= 2x2."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBlock(in_channels, width),
            ConvBlock(width, width),
            nn.MaxPool2d(2),
            ConvBlock(width, 2 * width),
            ConvBlock(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Flattens each input (an image or a table row) and applies `depth` hidden layers."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        hidden: int = 256,
        depth: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(int(n) for n in input_shape)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = hidden
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
