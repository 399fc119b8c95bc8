"""Datasets → seeded train/val/test splits → batch iterators on the device.  Driven by `conf/dataset/*.yaml`.

A dataset config names a dataset class with `dataset.source._target_` (a torchvision dataset or one of ours with the same
`data`/`targets`/`classes` attributes). Such datasets are small enough to be held as tensors: they are read once,
split with `dataset.split_seed`, resized/normalised once (or per batch on the device when that would not fit in
memory) and served by `InMemoryLoader` (`dataset.in_memory: true`) or a classic `DataLoader`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from lab.data.loaders import InMemoryLoader, Transform, make_dataloader
from lab.errors import UserError

# Preprocessed float splits up to this size are computed once and kept; bigger ones are normalised per batch.
PRECOMPUTE_MAX_BYTES = 2 * 1024**3


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]
    # Applied to each batch on the device (resize/normalise) when the splits hold raw tensors; else None.
    transform: Transform | None = None
    extra: dict = field(default_factory=dict)


class Preprocess:
    """uint8 or float images (N, C, H, W) → float, `channels` channels, `size`×`size`, normalised."""

    def __init__(self, size: int, channels: int, mean: list[float], std: list[float]) -> None:
        self.size, self.channels = size, channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std


def dataset_to_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """torchvision's in-memory datasets (MNIST, CIFAR, ...) and ours keep everything in `data`/`targets`.

    Images become (N, C, H, W); table rows (N, features) stay as they are. Integer targets are class indices
    (int64), real-valued ones regression targets (float32).
    """
    samples = torch.as_tensor(dataset.data)
    if samples.ndim == 3:  # (N, H, W) grayscale
        samples = samples.unsqueeze(1)
    elif samples.ndim == 4 and samples.shape[-1] in (1, 3) and samples.shape[1] not in (1, 3):  # (N, H, W, C)
        samples = samples.permute(0, 3, 1, 2)
    targets = torch.as_tensor(dataset.targets)
    targets = targets.float() if targets.is_floating_point() else targets.long()
    return samples.contiguous(), targets


# What torchvision's datasets raise for files that are not there (and no network to download them): a
# user's fix, not a bug. Anything else raised while building a dataset is shown with its traceback.
MISSING_FILES = (FileNotFoundError, ConnectionError, TimeoutError)


def _instantiate_dataset(cfg: DictConfig, **kwargs) -> Dataset:
    from urllib.error import URLError

    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    root = OmegaConf.select(cfg, "source.root")
    try:
        return instantiate(cfg.source, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        missing = isinstance(cause, (*MISSING_FILES, URLError)) or (
            # torchvision's wording for missing files, and for a download that cannot reach the network
            isinstance(cause, RuntimeError) and any(w in str(cause).lower() for w in ("not found", "downloading"))
        )
        if not missing:
            raise (cause or e) from None  # your dataset's own error, with its traceback
        raise UserError(
            f"could not load {cfg.name} ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})",
            f"dataset.source.root={root}",
            f"put {cfg.get('files', 'the dataset files')} under {Path(str(root)).resolve()}, "
            "or run once with internet and dataset.source.download=true",
        ) from None


def check_targets(targets: Tensor, num_classes: int | None, name: str) -> None:
    """Class indices must fit `num_classes` (else the loss fails with an IndexError mid-epoch)."""
    if num_classes is None or targets.is_floating_point() or not len(targets):
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= num_classes:
        raise UserError(
            f"{name} has labels {low}..{high}, outside 0..{num_classes - 1}",
            "dataset.num_classes",
            f"set dataset.num_classes={high + 1} (labels must be 0..num_classes-1)"
            if low >= 0
            else "labels must be class indices 0..num_classes-1",
        )


def _split(n: int, fractions: list[float], seed: int) -> list[Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for f in fractions:
        size = max(1, round(n * f))
        parts.append(order[start : start + size])
        start += size
    parts.append(order[start:])
    return parts


def build_data(cfg: DictConfig) -> DataSplits:
    """Read the dataset named by `cfg.source` and return preprocessed, seeded splits."""
    if cfg.get("builder"):  # a data module that builds its own splits, e.g. lab.data.image_folder.build
        from hydra.utils import get_method

        return get_method(cfg.builder)(cfg)
    if cfg.get("has_test_split", False):
        train_x, train_y = dataset_to_tensors(source := _instantiate_dataset(cfg, train=True))
        test_x, test_y = dataset_to_tensors(_instantiate_dataset(cfg, train=False))
        val_idx, train_idx = _split(len(train_y), [cfg.val_fraction], cfg.split_seed)
    else:
        all_x, all_y = dataset_to_tensors(source := _instantiate_dataset(cfg))
        test_idx, val_idx, train_idx = _split(
            len(all_y), [cfg.test_fraction, cfg.val_fraction], cfg.split_seed
        )
        train_x, train_y, test_x, test_y = all_x, all_y, all_x[test_idx], all_y[test_idx]
    val_x, val_y = train_x[val_idx], train_y[val_idx]
    train_x, train_y = train_x[train_idx], train_y[train_idx]
    num_classes = cfg.get("num_classes")
    for split, y in (("train", train_y), ("val", val_y), ("test", test_y)):
        check_targets(y, num_classes, f"the {split} split of {cfg.name}")

    transform: Transform | None = None
    extra: dict = {}
    if "image_size" in cfg:
        preprocess = Preprocess(cfg.image_size, cfg.channels, list(cfg.mean), list(cfg.std))
        n_values = (len(train_y) + len(val_y) + len(test_y)) * cfg.channels * cfg.image_size**2
        transform = preprocess
        if n_values * 4 <= PRECOMPUTE_MAX_BYTES:
            train_x, val_x, test_x = (_chunked(preprocess, x) for x in (train_x, val_x, test_x))
            transform = None
    elif cfg.get("standardize", False):  # table rows: z-scores with the training split's statistics
        train_x, val_x, test_x, extra["standardize"] = standardize(train_x, val_x, test_x)
    if cfg.get("standardize_targets", False) and train_y.is_floating_point():  # regression targets, likewise
        train_y, val_y, test_y, extra["standardize_targets"] = standardize(train_y, val_y, test_y)
    for name in ("feature_names", "target_names"):  # table columns, in order, when the source knows them
        if getattr(source, name, None) is not None:
            extra[name] = [str(n) for n in getattr(source, name)]
    class_names = list(
        cfg.get("class_names") or getattr(source, "classes", None) or range(num_classes or 0)
    )
    return DataSplits(
        train=TensorDataset(train_x, train_y),
        val=TensorDataset(val_x, val_y),
        test=TensorDataset(test_x, test_y),
        class_names=[str(c) for c in class_names],
        transform=transform,
        extra=extra,
    )


def standardize(train: Tensor, *others: Tensor) -> tuple:
    """z-scores of every split with the training split's mean and std per column, and those statistics (kept in
    checkpoints and exports, so that predictions take raw values and answer in the target's units)."""
    mean, std = train.float().mean(0), train.float().std(0).nan_to_num(1.0).clamp_min(1e-8)
    stats = {"mean": mean.reshape(-1).tolist(), "std": std.reshape(-1).tolist()}
    return *((x.float() - mean) / std for x in (train, *others)), stats


def _chunked(fn: Transform, x: Tensor, chunk: int = 4096) -> Tensor:
    return torch.cat([fn(x[i : i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else fn(x)


def build_loaders(
    splits: DataSplits,
    cfg: DictConfig,
    device: torch.device,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, InMemoryLoader | object]:
    """`train` (shuffled per epoch), `val` and `test` iterators yielding batches on `device`."""
    loaders = {}
    for stage, dataset in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        shuffle = stage == "train"
        if cfg.in_memory and isinstance(dataset, TensorDataset):
            x, y = (t.to(device) for t in dataset.tensors)
            loaders[stage] = InMemoryLoader(
                x, y, cfg.batch_size, shuffle, seed, splits.transform, rank=rank, world_size=world_size
            )
        else:
            loaders[stage] = make_dataloader(
                dataset,
                cfg.batch_size,
                shuffle,
                device,
                seed,
                cfg.num_workers,
                splits.transform,
                rank=rank,
                world_size=world_size,
                prefetch_factor=cfg.get("prefetch_factor"),
            )
    return loaders
