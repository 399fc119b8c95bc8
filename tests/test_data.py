"""Datasets and splits: the embedded digits, and torchvision datasets read from small fake files (no network)."""

from __future__ import annotations

import json
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


def test_splits_are_stratified_stable_as_samples_are_added_and_val_is_a_share_of_training() -> None:
    from lab.data import split_indices

    labels = [i % 3 for i in range(60)]
    test, val, train_part = split_indices(60, [0.2, 0.25], seed=0, labels=labels)
    assert sorted(test + val + train_part) == list(range(60))  # disjoint, complete
    assert [sum(labels[i] == c for i in test) for c in range(3)] == [4, 4, 4]  # stratified
    assert len(val) == round(48 * 0.25)  # val_fraction: a share of what the test split left
    grown = split_indices(61, [0.2, 0.25], seed=0, labels=[*labels, 0])  # one more sample of class 0
    moved = sum(len(set(old) - set(new)) for old, new in zip((test, val, train_part), grown, strict=True))
    assert moved <= 2  # at most one sample per part changes place (the old split moved 5 of 6 test files)
    other_seed = split_indices(60, [0.2, 0.25], seed=1, labels=labels)[0]
    assert other_seed != test


def test_digits_val_fraction_is_a_share_of_the_training_data(tmp_path: Path) -> None:
    splits = build_data(compose_config([], tmp_path).dataset)
    n_test = round(1797 * 0.2)
    assert (len(splits.test), len(splits.val)) == (n_test, round((1797 - n_test) * 0.1))
    for split in (splits.train, splits.val, splits.test):  # every class in every split
        assert set(split.tensors[1].tolist()) == set(range(10))


class TableWithNaN(torch.utils.data.Dataset):
    """A table whose `bad` row has a NaN feature (or an infinite target)."""

    def __init__(self, bad: int, where: str = "input") -> None:
        generator = torch.Generator().manual_seed(0)
        self.data = torch.randn(100, 4, generator=generator)
        self.targets = torch.randn(100, generator=generator)
        if where == "input":
            self.data[bad, 0] = float("nan")
        else:
            self.targets[bad] = float("inf")


@pytest.mark.parametrize("where", ["input", "target"])
def test_a_non_finite_value_in_any_split_is_one_line_naming_split_and_sample(
    where: str, tmp_path: Path
) -> None:
    from lab.data import split_indices

    test, val, train_part = split_indices(100, [0.2, 0.15], seed=0)
    for split, bad in (("test", test[3]), ("val", val[0]), ("train", train_part[5])):
        cfg = compose_config(["dataset=diabetes", "model=mlp", "task=regression",
                              "dataset.source._target_=test_data.TableWithNaN", f"+dataset.source.bad={bad}",
                              f"+dataset.source.where={where}", "~dataset.source.name",
                              "dataset.standardize_targets=false", "dataset.num_features=4"], tmp_path)  # fmt: skip
        with pytest.raises(UserError) as e:
            build_data(cfg.dataset)
        assert f"non-finite {where} value" in e.value.what and e.value.where == f"{split} split, sample {bad}"


def test_a_class_names_list_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    cfg = compose_config(["dataset=wine", "model=mlp", "+dataset.class_names=[a,b]"], tmp_path)
    with pytest.raises(UserError, match="2 class names for 3 classes"):
        build_data(cfg.dataset)


def fake_images(tmp_path: Path, per_class: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("ant", "bee", "fly")):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 70 * c, 30, size=(20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / name / f"{i}.png")
    return tmp_path / "imgs"


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_torchvision_dataset_with_its_transforms_is_a_source(in_memory: bool, tmp_path: Path) -> None:
    """torchvision's ImageFolder: its transforms make tensors, lab splits (stratified, by file path) and trains."""
    from omegaconf import OmegaConf

    from lab.train import run

    root = fake_images(tmp_path)
    cfg = compose_config(["logger=none", "monitor=none", "trainer.max_epochs=1", "dataset.image_size=16",
                          "dataset.channels=3", "dataset.num_classes=3", "dataset.mean=[0.5,0.5,0.5]",
                          "dataset.std=[0.25,0.25,0.25]", "dataset.test_fraction=0.25", "dataset.num_workers=0",
                          f"dataset.in_memory={in_memory}", "print_config=false", "trainer.progress_bar=false"],
                         tmp_path / "run")  # fmt: skip
    cfg.dataset.source = OmegaConf.create({
        "_target_": "torchvision.datasets.ImageFolder", "root": str(root),
        "transform": {"_target_": "torchvision.transforms.v2.Compose", "transforms": [
            {"_target_": "torchvision.transforms.v2.PILToTensor"},
            {"_target_": "torchvision.transforms.v2.Resize", "size": [16, 16], "antialias": True}]},
    })  # fmt: skip
    splits = build_data(cfg.dataset)
    assert splits.class_names == ["ant", "bee", "fly"] and (len(splits.train), len(splits.test)) == (16, 6)
    if not in_memory:  # index views of the dataset, read per batch: stratified, each file in one split
        files = [
            splits.train.dataset.samples[i][0]
            for s in (splits.train, splits.val, splits.test)
            for i in s.indices
        ]
        assert len(set(files)) == 24
        assert sorted(splits.test.dataset.targets[i] for i in splits.test.indices) == [0, 0, 1, 1, 2, 2]
    x, y = next(iter(build_loaders(splits, cfg.dataset, torch.device("cpu"), seed=0)["train"]))
    assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    if not in_memory:
        assert np.isfinite(run(cfg))
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert metrics["status"] == "success" and np.isfinite(metrics["test/loss"])


class HFTable(torch.utils.data.Dataset):
    """A Hugging Face `datasets` table read from a local file, as a user would wrap one: rows → (x, y)."""

    def __init__(self, path: str, features: list[str], target: str, cache_dir: str) -> None:
        import datasets

        table = datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=cache_dir)
        self.table, self.features, self.target = table.with_format("torch"), list(features), target
        self.classes = table.features[target].names

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int):
        row = self.table[index]
        return torch.stack([row[name] for name in self.features]).float(), row[self.target]


def test_a_hugging_face_table_from_local_files_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    from lab.train import run

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # local files only: no network here
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 3)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0).astype(int)
    table = datasets.Dataset.from_dict(
        {"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "label": labels},
        features=datasets.Features({**{k: datasets.Value("float32") for k in "abc"},
                                    "label": datasets.ClassLabel(names=["low", "mid", "high"])}),
    )  # fmt: skip
    table.to_parquet(str(tmp_path / "rows.parquet"))
    overrides = ["dataset=wine", "model=mlp", "logger=none", "monitor=none", "trainer.max_epochs=2",
                 "dataset.source._target_=test_data.HFTable", "~dataset.source.name",
                 f"+dataset.source.path={tmp_path / 'rows.parquet'}", "+dataset.source.features=[a,b,c]",
                 "+dataset.source.target=label", f"+dataset.source.cache_dir={tmp_path / 'hf'}",
                 "dataset.num_features=3", "dataset.num_classes=3", "print_config=false", "trainer.progress_bar=false"]  # fmt: skip
    cfg = compose_config(overrides, tmp_path / "run")
    splits = build_data(cfg.dataset)  # in_memory: every row read once, then the fast path
    assert splits.class_names == ["low", "mid", "high"] and splits.train.tensors[0].shape[1] == 3
    assert len(splits.train) + len(splits.val) + len(splits.test) == 90
    assert np.isfinite(run(cfg))
    with pytest.raises(UserError, match="needs all of it in memory"):  # standardising needs the whole table
        build_data(compose_config([*overrides, "dataset.in_memory=false"], tmp_path).dataset)


class Rows(torch.utils.data.Dataset):
    """A dataset read sample by sample (no `data` attribute); sample 7 has an infinite feature."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int):
        x = torch.full((3,), float(index))
        x[0] = float("inf") if index == 7 else x[0]
        return x, index % 2


def test_a_non_finite_sample_read_by_a_dataloader_is_one_line(tmp_path: Path) -> None:
    from lab.data import SampleError

    cfg = compose_config(["dataset=wine", "model=mlp", "dataset.source._target_=test_data.Rows", "~dataset.source.name",
                          "dataset.in_memory=false", "dataset.standardize=false", "dataset.num_workers=0",
                          "dataset.num_classes=2", "dataset.num_features=3"], tmp_path)  # fmt: skip
    splits = build_data(cfg.dataset)
    split = next(s for s in ("train", "val", "test") if 7 in getattr(splits, s).indices)
    with pytest.raises(SampleError) as e:
        for _ in build_loaders(splits, cfg.dataset, torch.device("cpu"), seed=0)[split]:
            pass
    assert (
        e.value.line().startswith("error: non-finite input value")
        and f"{split} split, sample 7" in e.value.line()
    )
