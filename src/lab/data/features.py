"""`model.cache_features`: run a frozen backbone over each split once, then train the head on the stored vectors.

With a frozen backbone and no train-time augmentation the backbone's output is the same every epoch, so each epoch
only needs the head. Features are computed once under `torch.inference_mode()`, in dataset order, and served by
`InMemoryLoader` with the same seeded shuffling as the image loaders, so training sees the same batches in the same
order as without caching. The trainer then calls `model.head` while checkpoints keep the full model.

With k-fold cross-validation (`dataset.folds`) the features of the pool the folds are cut from (train ∪ val, in an
order no fold changes) are computed once and each fold takes its rows, so with the disk cache below the folds of a
sweep extract train and val once between them, and the test split once.

With `paths.feature_cache` (a folder; null: off) the features are also kept on disk, shared by later runs and by
every job of a sweep: one file per split (or pool), named by a hash of everything the features depend on (backbone and
its weights' fingerprint, dataset config, content: the tensors, or each image file's path, label, size and
modification time; split, preprocessing, dtype, device type). A lock lets one job extract while the others wait;
files are written to a temp name and renamed, so nobody reads half a file; a corrupt or stale file is rebuilt
with a warning. `make clean-cache` empties the folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lab.data import DataSplits
from lab.data.loaders import InMemoryLoader, make_dataloader
from lab.errors import UserError

log = logging.getLogger(__name__)


def use_cache(model: nn.Module, splits: DataSplits, per_batch: Sequence[tuple[str, str]] = ()) -> bool:
    """`cache_features`: true → must be possible, auto → when possible, false → never.

    `per_batch`: the (key, verb) of each batch transform that is on, e.g. `("mix", "mixes")`: the images of every
    batch change, so features cannot be computed once.
    """
    mode = str(getattr(model, "cache_features", False))
    if mode == "False":
        return False
    for key, what in per_batch:
        if mode == "True":
            raise UserError(f"cannot cache features: {key} {what} the images of every batch", "model.cache_features",
                            f"use model.cache_features=auto or false, or leave {key} unset")  # fmt: skip
        if model.can_cache_features():
            log.info("model.cache_features=auto: off, since %s changes the images of every batch", key)
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


# Dataset keys that change how batches are served, not what the features are.
LOADER_KEYS = ("batch_size", "num_workers", "in_memory", "prefetch_factor", "pin_memory")
# Keys that choose which samples a split holds: its content hash says that, so e.g. the test split, the same in
# every fold of a k-fold sweep, is extracted once.
MEMBERSHIP_KEYS = ("fold", "folds")


def content_hash(dataset: Any) -> str | None:
    """What a split's features are computed from: sha256 of a TensorDataset's tensors (seconds even for GBs, next
    to minutes of extraction), or of each image file's path, label, size and modification time (an edited, added,
    removed or moved file changes it). None for any other dataset: its features are not kept on disk."""
    digest = hashlib.sha256()
    if isinstance(dataset, TensorDataset):
        for t in dataset.tensors:
            t = t.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                digest.update(t.view(-1).view(torch.uint8).numpy().data)
        return digest.hexdigest()
    samples = getattr(dataset, "samples", None)  # ImageFiles: (path, label) pairs
    if samples is None:
        return None
    for path, label in samples:
        stat = Path(path).stat()
        digest.update(f"{Path(path).resolve()}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(model: nn.Module, weights: str, cfg: DictConfig, stage: str, dataset: Any,
              device: torch.device) -> dict:  # fmt: skip
    """Everything the features of one split depend on (`weights`: the backbone's fingerprint)."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True)
    return {
        "backbone": getattr(model, "name", type(model).__name__),
        "weights": weights,
        "dataset": {k: v for k, v in data.items() if k not in (*LOADER_KEYS, *MEMBERSHIP_KEYS)},
        "content": content_hash(dataset),
        "size": len(dataset),
        "split": stage,
        "dtype": str(torch.get_default_dtype()),
        "device": device.type,
    }


def cached_split(cache_dir: str | Path, key: dict, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
    """(features, targets) from `cache_dir`, or `compute()`d and stored there; one process computes at a time."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key['backbone']}-{key['split']}-{digest}.pt"
    with open(folder / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a sweep's other jobs wait here for the first one's file
        if path.exists():
            try:
                entry = torch.load(path, map_location="cpu", weights_only=True)
                if entry["key"] != key or not len(entry["features"]) == key["size"] == len(entry["targets"]):
                    raise ValueError("it was made for other data or another backbone")
                log.info("features of %s loaded from the feature cache %s", key["split"], path)
                return entry["features"], entry["targets"], True
            except Exception as e:
                log.warning("feature cache %s is unreadable or stale (%s: %s): extracting again", path,
                            type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")  # fmt: skip
        features, targets = compute()
        from lab.checkpoint import serialize, write_atomic

        entry = {"features": features.cpu(), "targets": targets.cpu(), "key": key}
        write_atomic(serialize(entry), path)  # temp file + rename: never half a file under this name
        return features, targets, False


STAGES = ("train", "val", "test")


def fold_pool(splits: DataSplits) -> Dataset | None:
    """k-fold: the samples train and val hold together, in the order the folds are cut from, which no fold changes.
    Its features, computed (and kept on disk) once, serve every fold: `splits.fold_positions` picks each fold's
    rows. It holds the splits' own inputs and targets, so a fold that changed them (standardised with its own
    training split's statistics) gets a pool, and a cache entry, of its own. None without folds, or for splits read
    sample by sample (their features are not kept on disk either)."""
    if splits.fold_positions is None:
        return None
    from lab.data.image_folder import ImageFiles

    (train_pos, val_pos), train, val = splits.fold_positions, splits.train, splits.val
    size = len(train_pos) + len(val_pos)
    if isinstance(train, TensorDataset) and isinstance(val, TensorDataset):
        tensors = []
        for a, b in zip(train.tensors, val.tensors, strict=True):
            both = a.new_empty((size, *a.shape[1:]))
            both[train_pos], both[val_pos] = a, b
            tensors.append(both)
        return TensorDataset(*tensors)
    if isinstance(train, ImageFiles) and isinstance(val, ImageFiles):  # read as val is (cached: no augmentation)
        samples: list = [None] * size
        for positions, split in ((train_pos, train), (val_pos, val)):
            for position, sample in zip(positions, split.samples, strict=True):
                samples[position] = sample
        return ImageFiles(samples, val.transform, val.channels)
    return None


def cached_loaders(
    model: nn.Module,
    splits: DataSplits,
    cfg: DictConfig,
    device: torch.device,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    cache_dir: str | Path | None = None,
) -> dict[str, InMemoryLoader]:
    """Every rank extracts the whole split (it is cheap next to training) and serves its own shard."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    loaders, loaded = {}, []
    weights = model.features_fingerprint() if cache_dir else ""  # hashed once: ~1 s for VGG19
    pool = fold_pool(splits)
    parts = {"pool": pool, "test": splits.test} if pool is not None else {s: getattr(splits, s) for s in STAGES}
    computed = {}
    for stage, dataset in parts.items():

        def compute(dataset=dataset):
            return extract(model.features, dataset, cfg, splits.transform, device)

        key = cache_key(model, weights, cfg, stage, dataset, device) if cache_dir else None
        if key is not None and key["content"] is None:
            log.info("feature cache: off for %s (its content cannot be fingerprinted)", stage)
        if key is not None and key["content"] is not None:
            x, y, hit = cached_split(cache_dir, key, compute)
            x, y = x.to(device), y.to(device)
            loaded.append(hit)
        else:
            x, y = compute()
        computed[stage] = x, y
    if pool is not None:  # each fold's train and val: rows of the pool's features
        x, y = computed.pop("pool")
        for stage, positions in zip(("train", "val"), splits.fold_positions, strict=True):
            index = torch.as_tensor(positions, dtype=torch.long, device=x.device)
            computed[stage] = x[index], y[index]
    for stage in STAGES:
        x, y = computed[stage]
        loaders[stage] = InMemoryLoader(
            x.clone(), y.clone(), cfg.batch_size, stage == "train", seed, rank=rank, world_size=world_size
        )
    model.train(was_training)
    how = ", loaded from the feature cache" if loaded and all(loaded) else ""
    log.info("cached backbone features %s%s in %.1fs: the head trains on them", tuple(x.shape[1:]), how,
             time.perf_counter() - start)  # fmt: skip
    return loaders
