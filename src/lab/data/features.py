"""`model.cache_features`: run a frozen backbone over each split once, then train the head on the stored vectors.

With a frozen backbone and no train-time augmentation the backbone's output is the same every epoch, so each epoch
only needs the head. Features are computed once under `torch.inference_mode()`, in dataset order, and served by
`InMemoryLoader` with the same seeded shuffling as the image loaders, so training sees the same batches in the same
order as without caching. The trainer then calls `model.head` while checkpoints keep the full model.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import TensorDataset

from lab.data import DataSplits
from lab.data.loaders import InMemoryLoader, make_dataloader
from lab.errors import UserError

log = logging.getLogger(__name__)


def use_cache(model: nn.Module, splits: DataSplits) -> bool:
    """`cache_features`: true → must be possible, auto → when possible, false → never."""
    mode = str(getattr(model, "cache_features", False))
    if mode == "False":
        return False
    augmented = bool(splits.extra.get("augmented"))
    possible = model.can_cache_features() and not augmented
    if mode == "True" and not possible:
        why = "dataset.augment=true changes the images every epoch" if augmented else "the backbone trains"
        raise UserError(f"cannot cache features: {why}", "model.cache_features",
                        "use model.cache_features=auto or false, or model.freeze=true with dataset.augment=false")  # fmt: skip
    return possible


@torch.inference_mode()
def extract(features: nn.Module, dataset: Any, cfg: DictConfig, transform: Any, device: torch.device):
    """(features, targets) for a whole split, in dataset order."""
    if isinstance(dataset, TensorDataset):  # whole batches by slicing, no per-sample __getitem__
        x, y = (t.to(device) for t in dataset.tensors)
        loader = InMemoryLoader(x, y, cfg.batch_size, shuffle=False, transform=transform)
    else:
        loader = make_dataloader(dataset, cfg.batch_size, False, device, 0, cfg.num_workers, transform)
    outputs, targets = [], []
    for x, y in loader:
        outputs.append(features(x))
        targets.append(y)
    return torch.cat(outputs), torch.cat(targets)


def cached_loaders(
    model: nn.Module,
    splits: DataSplits,
    cfg: DictConfig,
    device: torch.device,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, InMemoryLoader]:
    """Every rank extracts the whole split (it is cheap next to training) and serves its own shard."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    loaders = {}
    for stage in ("train", "val", "test"):
        x, y = extract(model.features, getattr(splits, stage), cfg, splits.transform, device)
        loaders[stage] = InMemoryLoader(
            x.clone(), y.clone(), cfg.batch_size, stage == "train", seed, rank=rank, world_size=world_size
        )
    model.train(was_training)
    log.info("cached backbone features %s in %.1fs: the head trains on them", tuple(x.shape[1:]),
             time.perf_counter() - start)  # fmt: skip
    return loaders
