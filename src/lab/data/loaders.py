"""Batch iterators the loop consumes: each yields `(inputs, targets)` already on the training device.

`InMemoryLoader` is the fast path for datasets that fit in memory: the whole split is one tensor on the device and
batches are drawn by shuffled index, with no per-sample `__getitem__`, collation or host-to-device copy.
`DeviceLoader` wraps a classic `DataLoader` for everything else. Both shuffle with a permutation derived from
`(seed, epoch)`, so the data order is reproducible and a resumed run sees the same batches.

Every loader the loop uses has `set_epoch(epoch)`, `len()` and `batches(start, stop)`: the batches `start:stop` of
the epoch (a run resumed mid-epoch starts at `start`). `as_loader` gives any other iterable of batches these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

Batch = tuple[Tensor, Tensor]
Transform = Callable[[Tensor], Tensor]


class InMemoryLoader:
    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        transform: Transform | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> Tensor | None:
        n = len(self.targets)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=generator)
        elif self.world_size == 1:
            return None  # plain slices: views, no copy
        else:
            indices = torch.arange(n)
        if (
            self.world_size > 1 and self.shuffle
        ):  # equal shards, like DistributedSampler (pad by wrapping around)
            per_rank = -(-n // self.world_size)
            indices = torch.cat([indices, indices[: per_rank * self.world_size - n]])
        if self.world_size > 1:  # evaluation: every sample exactly once over the ranks (shards differ by one)
            indices = indices[self.rank :: self.world_size]
        return indices.to(self.inputs.device)

    def _num_samples(self) -> int:
        n = len(self.targets)
        if self.world_size == 1:
            return n
        return -(-n // self.world_size) if self.shuffle else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        return -(-self._num_samples() // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(0, None)

    def batches(self, start: int, stop: int | None) -> Iterator[Batch]:
        """Batches `start:stop` (None: to the end); the skipped ones are not drawn at all."""
        indices = self._indices()
        first, end = start * self.batch_size, self._num_samples()
        if stop is not None:
            end = min(end, stop * self.batch_size)
        for offset in range(first, end, self.batch_size):
            if indices is None:
                x = self.inputs[offset : offset + self.batch_size]
                y = self.targets[offset : offset + self.batch_size]
            else:
                index = indices[offset : offset + self.batch_size]
                x, y = self.inputs.index_select(0, index), self.targets.index_select(0, index)
            yield (self.transform(x) if self.transform is not None else x), y


class DeviceLoader:
    """A `DataLoader` whose batches arrive on `device` (non-blocking from pinned memory on CUDA)."""

    def __init__(self, loader: DataLoader, device: torch.device, transform: Transform | None = None) -> None:
        self.loader, self.device, self.transform = loader, device, transform

    def set_epoch(self, epoch: int) -> None:
        sampler = self.loader.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(0, None)

    def batches(self, start: int, stop: int | None) -> Iterator[Batch]:
        """Batches `start:stop` (None: to the end); the skipped ones are loaded but not copied to the device."""
        for x, y in islice(self.loader, start, stop):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            yield (self.transform(x) if self.transform is not None else x), y


class IterableLoader:
    """Any re-iterable of `(inputs, targets)` batches (a `DataLoader`, a list) as a loader of the loop, its batches
    moved to `device` (when given)."""

    def __init__(self, source: Iterable[Batch], device: torch.device | None = None) -> None:
        self.source, self.device = source, device

    def set_epoch(self, epoch: int) -> None:
        for owner in (self.source, getattr(self.source, "sampler", None)):
            if callable(getattr(owner, "set_epoch", None)):
                owner.set_epoch(epoch)
                return

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(0, None)

    def batches(self, start: int, stop: int | None) -> Iterator[Batch]:
        for x, y in islice(self.source, start, stop):
            if self.device is not None:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield x, y


def as_loader(loader: Iterable[Batch], device: torch.device | None = None) -> Iterable[Batch]:
    """`loader` itself when it has `batches(start, stop)` and `set_epoch`, else an `IterableLoader` of it (its
    batches moved to `device`)."""
    if callable(getattr(loader, "batches", None)) and callable(getattr(loader, "set_epoch", None)):
        return loader
    return IterableLoader(loader, device)


def default_num_workers() -> int:
    """`dataset.num_workers: null`: one worker per CPU this process may use, keeping one for the loop (max 8)."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cpus - 1)


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    device: torch.device,
    seed: int,
    num_workers: int | None,
    transform: Transform | None = None,
    rank: int = 0,
    world_size: int = 1,
    prefetch_factor: int | None = None,
) -> DeviceLoader:
    if num_workers is None:
        num_workers = default_num_workers()
    if shuffle or world_size == 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    else:  # evaluation: every sample exactly once over the ranks, no padding that would count one twice
        sampler = range(rank, len(dataset), world_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )
    return DeviceLoader(loader, device, transform)
