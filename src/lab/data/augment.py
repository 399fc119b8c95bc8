"""Train-time augmentation (`augment=<preset>`, `conf/augment/*.yaml`) on the training batches on the device.

The loaders serve normalised batches (the in-memory fast path keeps its precomputed splits), while torchvision's
policies (AutoAugment, RandAugment, TrivialAugmentWide) expect images in [0, 1]. So each batch is unnormalised,
augmented image by image (every image draws its own random op, crop, flip or box, as with a DataLoader), and
normalised again. Validation and test batches are never augmented: only the `train` loader is wrapped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice

import torch
from torch import Tensor

from lab.data.loaders import Batch


class BatchAugment:
    """Normalised (N, C, H, W) batch → [0, 1] → `transform` per image → normalised with the same mean/std."""

    def __init__(self, transform: Callable[[Tensor], Tensor], mean: list[float], std: list[float]) -> None:
        self.transform = transform
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        images = (x.float() * self.std + self.mean).clamp_(0, 1)
        images = torch.stack([self.transform(image) for image in images])
        return ((images - self.mean) / self.std).to(x.dtype)


class AugmentedLoader:
    """The training loader, its batches augmented; length and per-epoch shuffling are the wrapped loader's."""

    def __init__(self, loader, augment: BatchAugment) -> None:
        self.loader, self.augment = loader, augment

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(0, None)

    def batches(self, start: int, stop: int | None) -> Iterator[Batch]:
        """Batches `start:stop`; the skipped ones are not augmented, so a run resumed mid-epoch (global RNG
        restored from the checkpoint) draws exactly what the uninterrupted run drew."""
        for x, y in islice(self.loader, start, stop):
            yield self.augment(x), y
