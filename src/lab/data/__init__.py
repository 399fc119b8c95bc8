"""Datasets → seeded train/val/test splits → batch iterators on the device.  Driven by `conf/dataset/*.yaml`.

A dataset config names a dataset with `dataset.source._target_`. What lab asks of it (the contract):

- a map-style `torch.utils.data.Dataset`: `__len__`, and `__getitem__(i)` → `(x, y)` with `x` a tensor (an image
  (C, H, W), uint8 or float in [0, 1], or a table row (features,)) and `y` a class index, a real value or a
  multi-hot vector (multi-label);
- optionally `classes` (class names), `feature_names`/`target_names` (tables);
- optionally `data` and `targets` holding everything at once (torchvision's MNIST/CIFAR, ours): the fast path.

With `data`/`targets`, or with `dataset.in_memory: true` (every sample is then read once), the splits are tensors,
preprocessed once (or per batch on the device when that would not fit) and served by `InMemoryLoader`. Otherwise
each split is a `torch.utils.data.Subset` of the dataset read by a `DataLoader`, preprocessed per batch.

Splits (`split_indices`): stratified by class, each sample placed by a hash of its key (file path, else index) and
`dataset.split_seed`, so that adding samples moves at most one per class and split. `test_fraction` is a share of
the whole dataset, `val_fraction` a share of what remains for training. Every split is checked before training:
non-finite inputs or targets, labels outside the classes (`check_split`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
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
    # k-fold: the positions of the train and val samples in the pool the folds are cut from (train ∪ val in an
    # order no fold changes), so that features of the pool computed once serve every fold; None without folds.
    fold_positions: tuple[list[int], list[int]] | None = None


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
    """All of a dataset as two tensors: its `data`/`targets` (torchvision's in-memory datasets, ours), else every
    `dataset[i]` read once and stacked.

    Images become (N, C, H, W); table rows (N, features) stay as they are. Integer targets are class indices
    (int64), real-valued ones (regression, multi-hot vectors) float32.
    """
    if hasattr(dataset, "data") and hasattr(dataset, "targets"):
        samples, targets = torch.as_tensor(dataset.data), torch.as_tensor(dataset.targets)
    else:
        pairs = [dataset[i] for i in range(len(dataset))]
        samples = torch.stack([torch.as_tensor(x) for x, _ in pairs])
        targets = torch.stack([torch.as_tensor(y) for _, y in pairs])
    if samples.ndim == 3:  # (N, H, W) grayscale
        samples = samples.unsqueeze(1)
    elif samples.ndim == 4 and samples.shape[-1] in (1, 3) and samples.shape[1] not in (1, 3):  # (N, H, W, C)
        samples = samples.permute(0, 3, 1, 2)
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
        if isinstance(cause, UserError):  # the dataset's own check of its files, e.g. a bad CSV cell
            raise cause from None
        missing = isinstance(cause, (*MISSING_FILES, URLError)) or (
            # torchvision's wording for missing files, and for a download that cannot reach the network
            isinstance(cause, RuntimeError)
            and any(w in str(cause).lower() for w in ("not found", "downloading"))
        )
        if not missing:
            raise (cause or e) from None  # your dataset's own error, with its traceback
        raise UserError(
            f"could not load {cfg.name} ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})",
            f"dataset.source.root={root}",
            f"put {cfg.get('files', 'the dataset files')} under {Path(str(root)).resolve()}, "
            "or run once with internet and dataset.source.download=true",
        ) from None


class SampleError(UserError):
    """A bad sample found while a `DataLoader` worker reads it (an undecodable image, a non-finite value).

    torch re-raises a worker's exception in the main process as `SampleError(<the worker's traceback>)`: the one
    line is recovered from it, so the user sees `error: ... (<file or sample>): ...`, not a worker traceback.
    """

    def __init__(self, what: str, where: str = "", fix: str = "") -> None:
        self.text = ""
        if not where and "\n" in what:  # torch's re-raise: "...\n<module>.SampleError: error: <line>"
            self.text = what.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(what, where, fix)

    def line(self) -> str:
        return self.text or super().line()


def check_split(x: Tensor, y: Tensor, num_classes: int | None, split: str, name: str,
                sample_names: Sequence[str] | None = None) -> None:  # fmt: skip
    """Before training: non-finite inputs or targets, and class indices outside 0..num_classes-1, named by split
    and sample (a NaN in the test split would else report test/loss=nan with status success)."""

    def where(index: int) -> str:
        return f"{split} split, {sample_names[index] if sample_names is not None else f'sample {index}'}"

    for what, values in (("input", x), ("target", y)):
        if values.is_floating_point() and len(values):
            bad = ~torch.isfinite(values.reshape(len(values), -1)).all(1)
            if bad.any():
                index = int(bad.nonzero()[0])
                raise UserError(f"non-finite {what} value ({int(bad.sum())} such samples in {name}'s {split} split)",
                                where(index), "fix or drop those samples in the data")  # fmt: skip
    if num_classes is None or y.is_floating_point() or not len(y):
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise UserError(
            f"the {split} split of {name} has labels {low}..{high}, outside 0..{num_classes - 1}",
            "dataset.num_classes",
            f"set dataset.num_classes={high + 1} (labels must be 0..num_classes-1)"
            if low >= 0
            else "labels must be class indices 0..num_classes-1",
        )


def check_class_names(names: Sequence[str], num_classes: int | None, given: bool = True) -> None:
    """One name per class (else predictions are mislabelled, or index past the list): `given` names come from
    `dataset.class_names`, the others from the dataset itself."""
    if num_classes is None or len(names) == num_classes:
        return
    if given:
        raise UserError(f"{len(names)} class names for {num_classes} classes", "dataset.class_names",
                        f"give {num_classes} names, or dataset.class_names=null to take the dataset's")  # fmt: skip
    raise UserError(f"the dataset has {len(names)} classes, the config {num_classes}", "dataset.num_classes",
                    f"set dataset.num_classes={len(names)}, or name every class in dataset.class_names")  # fmt: skip


def _place(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), "big")


def _quotas(sizes: list[int], fraction: float) -> list[int]:
    """`fraction` of each group, rounded so that the total is round(fraction × all) (largest remainders), ≥ 1."""
    exact = [n * fraction for n in sizes]
    quotas = [int(e) for e in exact]
    total = max(1, round(sum(sizes) * fraction))
    for g in sorted(range(len(sizes)), key=lambda g: exact[g] - quotas[g], reverse=True)[
        : total - sum(quotas)
    ]:
        quotas[g] += 1
    return quotas


def split_indices(n: int, fractions: Sequence[float], seed: int, labels: Sequence | None = None,
                  keys: Sequence[str] | None = None) -> list[list[int]]:  # fmt: skip
    """Indices of `len(fractions) + 1` disjoint parts of `n` samples: each fraction is a share of what the parts
    before it left, the last part is the rest (e.g. `[test_fraction, val_fraction]` → test, val, train).

    Stratified by `labels` (class indices; None: one group): each part holds the same share of every class. Within
    a class, samples are ordered by a hash of `(seed, key)` (`keys`: e.g. file paths; default the index) and the
    parts are consecutive runs of that order, so a sample's place never depends on the others: adding samples moves
    at most one sample per class from one part to the next.
    """
    keys = [str(i) for i in range(n)] if keys is None else list(keys)
    groups: dict = {}
    for index in range(n):
        groups.setdefault(0 if labels is None else labels[index], []).append(index)
    ordered = [sorted(members, key=lambda i: _place(seed, keys[i])) for _, members in sorted(groups.items())]
    parts = []
    for fraction in fractions:
        quotas = _quotas([len(members) for members in ordered], fraction)
        parts.append(sorted(i for members, q in zip(ordered, quotas, strict=True) for i in members[:q]))
        ordered = [members[q:] for members, q in zip(ordered, quotas, strict=True)]
    parts.append(sorted(i for members in ordered for i in members))
    return parts


def fold_indices(val_idx: Sequence[int], train_idx: Sequence[int], folds: int, fold: int, seed: int,
                 labels: Sequence | None = None, keys: Sequence[str] | None = None) -> tuple[list[int], list[int]]:  # fmt: skip
    """k-fold cross-validation (`dataset.folds`, `dataset.fold`): the samples train and val would hold, cut into
    `folds` folds placed like the splits (stratified by `labels`, each sample by a hash of its key and `seed`);
    fold `fold` validates and the others train. The test split is not touched. Returns (val, train) indices."""
    pool = sorted([*val_idx, *train_idx])
    parts = split_indices(
        len(pool), [1 / (folds - k) for k in range(folds - 1)], seed,
        [labels[i] for i in pool] if labels is not None else None,
        [keys[i] if keys is not None else str(i) for i in pool],
    )  # fmt: skip
    train = sorted(pool[j] for k, part in enumerate(parts) if k != fold for j in part)
    return [pool[j] for j in parts[fold]], train


def check_sizes(sizes: dict[str, int], name: str, where: str) -> None:
    """Every split needs a sample: with too few the fractions round to an empty split."""
    empty = [split for split, size in sizes.items() if not size]
    if empty:
        counts = ", ".join(f"{split} {size}" for split, size in sizes.items())
        raise UserError(f"too few samples in {name} for the splits ({counts}): the {empty[0]} split is empty", where,
                        "add data, or raise dataset.test_fraction / dataset.val_fraction")  # fmt: skip


class SplitView(Dataset):
    """One split of a dataset read sample by sample: the samples at `indices`, as its `__getitem__` returns them;
    a non-finite value is a `SampleError` naming the split and the sample."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], split: str) -> None:
        self.dataset, self.indices, self.split = dataset, list(indices), split

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.dataset[self.indices[index]]
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        for what, values in (("input", x), ("target", y)):
            if values.is_floating_point() and not torch.isfinite(values).all():
                raise SampleError(f"non-finite {what} value", f"{self.split} split, sample {self.indices[index]}",
                                  "fix or drop that sample in the data")  # fmt: skip
        return x, y


def build_data(cfg: DictConfig) -> DataSplits:
    """Read the dataset named by `cfg.source` and return checked, preprocessed, seeded splits."""
    if cfg.get("builder"):  # a data module that builds its own splits, e.g. lab.data.image_folder.build
        from hydra.utils import get_method

        return get_method(cfg.builder)(cfg)
    has_test = cfg.get("has_test_split", False)
    source = _instantiate_dataset(cfg, train=True) if has_test else _instantiate_dataset(cfg)
    test_source = _instantiate_dataset(cfg, train=False) if has_test else None
    num_classes = cfg.get("num_classes")
    class_names = [
        str(c) for c in cfg.get("class_names") or getattr(source, "classes", None) or range(num_classes or 0)
    ]
    check_class_names(class_names, num_classes, given=bool(cfg.get("class_names")) or not hasattr(source, "classes"))
    if not cfg.get("in_memory", False) and not (hasattr(source, "data") and hasattr(source, "targets")):
        return _streamed_splits(cfg, source, test_source, class_names)

    x, y = dataset_to_tensors(source)
    labels = y.tolist() if y.ndim == 1 and not y.is_floating_point() else None  # stratified by class
    if test_source is not None:
        test_x, test_y = dataset_to_tensors(test_source)
        val_idx, train_idx = split_indices(len(y), [cfg.val_fraction], cfg.split_seed, labels)
        test_idx = list(range(len(test_y)))
    else:
        test_idx, val_idx, train_idx = split_indices(
            len(y), [cfg.test_fraction, cfg.val_fraction], cfg.split_seed, labels
        )
        test_x, test_y = x[test_idx], y[test_idx]
    fold_positions = None
    if cfg.get("folds"):
        place = {index: position for position, index in enumerate(sorted([*val_idx, *train_idx]))}
        val_idx, train_idx = fold_indices(val_idx, train_idx, cfg.folds, cfg.fold, cfg.split_seed, labels)
        fold_positions = ([place[i] for i in train_idx], [place[i] for i in val_idx])
    val_x, val_y, train_x, train_y = x[val_idx], y[val_idx], x[train_idx], y[train_idx]
    sizes = {"train": len(train_y), "val": len(val_y), "test": len(test_y)}
    check_sizes(sizes, cfg.name, "dataset.test_fraction, dataset.val_fraction")
    for split, sx, sy, indices in (("train", train_x, train_y, train_idx), ("val", val_x, val_y, val_idx),
                                   ("test", test_x, test_y, test_idx)):  # fmt: skip
        check_split(sx, sy, num_classes, split, cfg.name, [f"sample {i}" for i in indices])

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
    return DataSplits(
        train=TensorDataset(train_x, train_y),
        val=TensorDataset(val_x, val_y),
        test=TensorDataset(test_x, test_y),
        class_names=class_names,
        transform=transform,
        extra=extra,
        fold_positions=fold_positions,
    )


def standardize(train: Tensor, *others: Tensor) -> tuple:
    """z-scores of every split with the training split's mean and std per column, and those statistics (kept in
    checkpoints and exports, so that predictions take raw values and answer in the target's units)."""
    mean, std = train.float().mean(0), train.float().std(0).nan_to_num(1.0).clamp_min(1e-8)
    stats = {"mean": mean.reshape(-1).tolist(), "std": std.reshape(-1).tolist()}
    return *((x.float() - mean) / std for x in (train, *others)), stats


def _streamed_splits(cfg: DictConfig, source: Dataset, test_source: Dataset | None, class_names: list[str]):
    """Splits of a dataset read sample by sample (`in_memory: false`, no `data`/`targets`): index views of it,
    stratified by its `targets` when it has them (torchvision's ImageFolder), placed by its files' paths when it
    lists them in `samples`, preprocessed per batch on the device."""
    if cfg.get("standardize", False):
        raise UserError("standardising a table needs all of it in memory", "dataset.standardize",
                        "set dataset.in_memory=true (or dataset.standardize=false)")  # fmt: skip
    targets = getattr(source, "targets", None)
    labels = (
        [int(t) for t in targets]
        if targets is not None and not torch.as_tensor(targets).is_floating_point()
        else None
    )
    keys = [str(sample[0]) for sample in source.samples] if hasattr(source, "samples") else None
    if test_source is not None:
        val_idx, train_idx = split_indices(len(source), [cfg.val_fraction], cfg.split_seed, labels, keys)
        test = SplitView(test_source, range(len(test_source)), "test")
    else:
        test_idx, val_idx, train_idx = split_indices(
            len(source), [cfg.test_fraction, cfg.val_fraction], cfg.split_seed, labels, keys
        )
        test = SplitView(source, test_idx, "test")
    if cfg.get("folds"):
        val_idx, train_idx = fold_indices(val_idx, train_idx, cfg.folds, cfg.fold, cfg.split_seed, labels, keys)
    train, val = SplitView(source, train_idx, "train"), SplitView(source, val_idx, "val")
    check_sizes({"train": len(train), "val": len(val), "test": len(test)}, cfg.name,
                "dataset.test_fraction, dataset.val_fraction")  # fmt: skip
    for split in (train, val, test):  # class indices, when the dataset lists them, without reading a sample
        y = getattr(split.dataset, "targets", None)
        if y is not None:
            y = torch.as_tensor(y)[torch.as_tensor(split.indices, dtype=torch.long)]
            check_split(torch.empty(0), y, cfg.get("num_classes"), split.split, cfg.name)
    transform = (
        Preprocess(cfg.image_size, cfg.channels, list(cfg.mean), list(cfg.std))
        if "image_size" in cfg
        else None
    )
    return DataSplits(train=train, val=val, test=test, class_names=class_names, transform=transform)


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
