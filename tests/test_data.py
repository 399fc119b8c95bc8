"""Datasets and splits: the embedded digits, and torchvision datasets read from small fake files (no network)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, train

from lab.data import Preprocess, build_data, build_loaders
from lab.errors import UserError


def write_idx(root: Path, folder: str, n_train: int = 60, n_test: int = 20, seed: int = 0) -> None:
    """The four uncompressed IDX files torchvision's MNIST/FashionMNIST look for in <root>/<folder>/raw."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
        )
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def test_digits_splits_are_seeded_disjoint_and_normalised(tmp_path: Path) -> None:
    cfg = compose_config([], tmp_path)
    a, b = build_data(cfg.dataset), build_data(cfg.dataset)
    sizes = [len(a.train), len(a.val), len(a.test)]
    assert sum(sizes) == 1797 and sizes[2] == round(1797 * 0.2)
    for split in ("train", "val", "test"):  # deterministic: same split_seed → same data
        assert torch.equal(getattr(a, split).tensors[0], getattr(b, split).tensors[0])
    x = a.train.tensors[0]
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1  # normalised with dataset.mean/std
    assert a.class_names == [str(i) for i in range(10)]
    other = build_data(compose_config(["dataset.split_seed=1"], tmp_path).dataset)
    assert not torch.equal(a.test.tensors[0], other.test.tensors[0])


@pytest.mark.parametrize(("option", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_idx_datasets_from_local_files(option: str, folder: str, tmp_path: Path) -> None:
    write_idx(tmp_path / "data", folder)
    cfg = compose_config([f"dataset={option}", f"paths.data_dir={tmp_path / 'data'}"], tmp_path)
    splits = build_data(cfg.dataset)
    assert len(splits.test) == 20 and len(splits.train) + len(splits.val) == 60
    assert splits.train.tensors[0].shape[1:] == (1, 28, 28)
    assert len(splits.class_names) == 10
    loaders = build_loaders(splits, cfg.dataset, torch.device("cpu"), seed=0)
    x, y = next(iter(loaders["train"]))
    assert x.shape[1:] == (1, 28, 28) and y.dtype == torch.long


def test_cifar10_from_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as cifar

    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), "labels": list(range(8))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    # The real files' md5 sums cannot be matched by fake data: skip only that integrity check.
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    cfg = compose_config(["dataset=cifar10", f"paths.data_dir={tmp_path / 'data'}"], tmp_path)
    splits = build_data(cfg.dataset)
    assert len(splits.test) == 8 and len(splits.train) + len(splits.val) == 40
    assert splits.train.tensors[0].shape[1:] == (3, 32, 32)
    assert splits.class_names[:2] == ["class0", "class1"]


def test_missing_dataset_files_is_one_clear_error(tmp_path: Path) -> None:
    cfg = compose_config(
        ["dataset=mnist", f"paths.data_dir={tmp_path}", "dataset.source.download=false"], tmp_path
    )
    with pytest.raises(UserError) as info:
        build_data(cfg.dataset)
    line = info.value.line()
    assert (
        "dataset.source.root" in line
        and "MNIST/raw/train-images-idx3-ubyte" in line
        and str(tmp_path) in line
    )


def test_missing_dataset_through_the_cli_fails_before_training(tmp_path: Path) -> None:
    proc = train(
        tmp_path / "run", "dataset=mnist", f"paths.data_dir={tmp_path / 'empty'}", "dataset.source.download=false",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "dataset.source.root" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_preprocess_resizes_expands_channels_and_normalises() -> None:
    pre = Preprocess(size=16, channels=3, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    x = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    y = pre(x)
    assert y.shape == (2, 3, 16, 16) and torch.allclose(y, torch.ones_like(y))


def test_image_size_override_resizes_once_up_front(tmp_path: Path) -> None:
    splits = build_data(compose_config(["dataset.image_size=16"], tmp_path).dataset)
    assert splits.train.tensors[0].shape[1:] == (1, 16, 16) and splits.transform is None
