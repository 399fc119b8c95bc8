"""k-fold cross-validation: `dataset.folds=k dataset.fold=i` cuts what the test split leaves into k stratified,
seeded folds (in-memory tables and images, image folders), the test split untouched; `sweep=kfold` runs every
fold and the summary aggregates them like seeds."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import QUIET, TINY, compose_config, in_process
from test_image_folder import image_folder_config, make_images

import lab.data.features as features
from lab.config import validate
from lab.data import build_data
from lab.data.features import fold_pool
from lab.errors import UserError
from lab.train import run


def rows(dataset) -> list[tuple]:
    """Each sample of a TensorDataset as a hashable row (inputs and target)."""
    x, y = dataset.tensors
    return [(*x[i].flatten().tolist(), float(y[i])) for i in range(len(y))]


def test_folds_partition_what_the_test_split_leaves_stratified(tmp_path: Path) -> None:
    raw = "dataset.standardize=false"  # rows as they are: each fold standardises with its own training split
    plain = build_data(compose_config(["dataset=wine", raw], tmp_path).dataset)
    pool = Counter(rows(plain.train) + rows(plain.val))
    vals = []
    for fold in range(4):
        splits = build_data(compose_config(["dataset=wine", raw, "dataset.folds=4", f"dataset.fold={fold}"],
                                           tmp_path).dataset)  # fmt: skip
        assert rows(splits.test) == rows(plain.test)  # untouched by the folds
        train, val = rows(splits.train), rows(splits.val)
        assert Counter(train + val) == pool and not set(train) & set(val)
        vals.append(val)
        # Stratified: each class's share of the fold within one sample of its share of the pool.
        labels = Counter(int(v[-1]) for v in val)
        for label, count in Counter(int(v[-1]) for v in pool.elements()).items():
            assert abs(labels[label] - count / 4) <= 1, (fold, label)
    assert Counter(row for val in vals for row in val) == pool  # every sample validates exactly once
    assert {len(v) for v in vals} <= {len(pool) // 4, len(pool) // 4 + 1}


def test_folds_of_an_image_folder_never_share_a_file(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=10)
    plain = build_data(image_folder_config(root, tmp_path).dataset)
    pool = {p for split in (plain.train, plain.val) for p, _ in split.samples}
    seen: list[str] = []
    for fold in range(3):
        splits = build_data(
            image_folder_config(root, tmp_path, "dataset.folds=3", f"dataset.fold={fold}").dataset
        )
        train, val = ({p for p, _ in s.samples} for s in (splits.train, splits.val))
        assert [p for p, _ in splits.test.samples] == [p for p, _ in plain.test.samples]
        assert train | val == pool and not train & val
        seen += sorted(val)
    assert sorted(seen) == sorted(pool)


def test_a_fold_outside_the_folds_is_one_line(tmp_path: Path) -> None:
    cfg = compose_config(["dataset=wine", "model=mlp", "dataset.folds=5", "dataset.fold=5"], tmp_path)
    with pytest.raises(UserError) as e:
        validate(cfg)
    assert e.value.line() == "error: fold 5 of 5 folds (dataset.fold): use 0..4"


def test_a_kfold_sweep_is_aggregated_over_its_folds(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    in_process("train.py", ["-m", f"hydra.sweep.dir={sweep_dir}", "sweep=kfold", "dataset=wine",
                            "trainer.max_epochs=1", "trainer.progress_bar=false", "print_config=false",
                            "checkpoint=none", "logger=none"], check=True)  # fmt: skip
    jobs = [json.loads((sweep_dir / str(j) / "metrics.json").read_text()) for j in range(5)]
    with open(sweep_dir / "summary_configs.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))  # one configuration, five folds
    values = [job["test/acc"] for job in jobs]
    assert int(row["test/acc_n"]) == 5
    assert float(row["test/acc_mean"]) == pytest.approx(statistics.fmean(values), abs=1e-12)
    assert float(row["test/acc_std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert not math.isnan(float(row["best_mean"]))


def test_every_fold_is_cut_from_the_same_pool(tmp_path: Path) -> None:
    """What lets every fold share one set of cached features (in-memory images here; an image folder's pool is
    checked through the cache below): the pool (train ∪ val) is the same whatever the fold, and each fold's train
    and val are exactly its rows."""
    config = lambda *o: compose_config(["dataset=digits", *o], tmp_path).dataset  # noqa: E731
    assert build_data(config()).fold_positions is None
    pools = []
    for fold in range(2):
        splits = build_data(config("dataset.folds=3", f"dataset.fold={fold}"))
        pool = fold_pool(splits).tensors
        for split, positions in zip((splits.train, splits.val), splits.fold_positions, strict=True):
            assert all(
                torch.equal(own, rows[positions]) for own, rows in zip(split.tensors, pool, strict=True)
            )
        pools.append(pool)
    assert all(torch.equal(a, b) for a, b in zip(*pools, strict=True))


def test_folds_reuse_the_cached_features_of_their_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fold 1 after fold 0 pushes nothing through the backbone (the pool and the test split come from the cache),
    and scores exactly what it scores without the cache, and within float noise what it scores with the backbone
    run on every batch (batches of other sizes: rtol 1e-4 on the loss)."""
    extracted: list[int] = []  # sizes of what went through the backbone
    real = features.extract
    monkeypatch.setattr(
        features, "extract", lambda net, data, *a: extracted.append(len(data)) or real(net, data, *a)
    )
    root = make_images(tmp_path / "images", per_class=6)
    cache = tmp_path / "cache"
    args = ["dataset=image_folder", f"dataset.root={root}", "dataset.num_workers=0", "dataset.batch_size=4",
            "model=resnet18_frozen", "model.weights=null", "dataset.image_size=32", "dataset.folds=3",
            "logger=none", "monitor=none", "checkpoint=none", *QUIET, *TINY]  # fmt: skip

    def fold(i: int, name: str, *more: str) -> dict:
        run(compose_config([*args, f"dataset.fold={i}", *more], tmp_path / name))
        return json.loads((tmp_path / name / "metrics.json").read_text())

    fold(0, "fold0", f"paths.feature_cache={cache}")
    assert extracted == [16, 2]  # the pool (train ∪ val), then the test split
    assert sorted(p.name.split("-")[1] for p in cache.glob("*.pt")) == ["pool", "test"]
    cached = fold(1, "fold1", f"paths.feature_cache={cache}")
    assert extracted == [16, 2] and len(list(cache.glob("*.pt"))) == 2  # nothing new
    plain = fold(1, "plain", "paths.feature_cache=null")
    assert extracted == [16, 2, 16, 2]
    final = [k for k in cached if k.startswith(("val/", "test/"))]
    assert final and {k: cached[k] for k in final} == {k: plain[k] for k in final}
    uncached = fold(1, "uncached", "model.cache_features=false")
    assert len(extracted) == 4  # the backbone ran on every batch instead
    for k in final:
        assert cached[k] == pytest.approx(uncached[k], rel=1e-4, abs=1e-6), k
