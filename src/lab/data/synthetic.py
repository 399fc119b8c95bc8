"""Generated images of any size: for timing (`make bench` uses an MNIST-sized set) and for trying a model
on data of a given shape before the real data is at hand. No files, no download.

Each class is a fixed random pattern plus noise, so a model can learn it and accuracy means something.
"""

from __future__ import annotations

import torch


class Synthetic(torch.utils.data.Dataset):
    """Same attributes as torchvision's MNIST: `data` (N, C, H, W) uint8, `targets`, `classes`."""

    def __init__(
        self,
        num_samples: int = 60_000,
        channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        noise: float = 0.5,
        seed: int = 0,
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        prototypes = torch.rand(num_classes, channels, image_size, image_size, generator=generator)
        self.targets = torch.randint(num_classes, (num_samples,), generator=generator)
        self.data = torch.empty(num_samples, channels, image_size, image_size, dtype=torch.uint8)
        for start in range(0, num_samples, 8192):  # in chunks: a float copy of 60,000 images is not needed
            labels = self.targets[start : start + 8192]
            noisy = prototypes[labels] + noise * torch.randn(
                len(labels), channels, image_size, image_size, generator=generator
            )
            self.data[start : start + 8192] = (noisy.clamp(0, 1) * 255).round().to(torch.uint8)
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data[index], int(self.targets[index])
