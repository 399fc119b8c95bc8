"""The frozen-backbone feature cache on disk: shared by runs, keyed by what features depend on, safe to share."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FEW_IMAGES, TINY, compose_config

import lab.data.features as features
from lab.data.features import cached_split
from lab.train import run

ARGS = ["model=mobilenet_v3_small_frozen", "model.weights=null", "dataset.image_size=32", "logger=none", "monitor=none",
        "print_config=false", "trainer.progress_bar=false", *TINY]  # fmt: skip


@pytest.fixture
def extractions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A spy on the backbone pass: how many splits each run pushed through the backbone."""
    calls: list[int] = []
    real = features.extract

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "extract", spy)
    return calls


def test_second_run_loads_instead_of_extracting(tmp_path: Path, extractions: list[int]) -> None:
    cache = tmp_path / "cache"
    args = [*ARGS, *FEW_IMAGES]
    run(compose_config([*args, f"paths.feature_cache={cache}"], tmp_path / "a"))
    assert len(extractions) == 3 and len(list(cache.glob("mobilenet_v3_small-*.pt"))) == 3
    run(compose_config([*args, f"paths.feature_cache={cache}", "optimizer.lr=0.01"], tmp_path / "b"))
    assert len(extractions) == 3  # the second run never called the backbone
    # Same features, same seed: the same result as a run without any cache.
    run(compose_config([*args, "paths.feature_cache=null", "optimizer.lr=0.01"], tmp_path / "c"))
    assert len(extractions) == 6
    b, c = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "bc")
    assert b["val/acc"] == c["val/acc"] and b["test/loss"] == c["test/loss"]
    # Anything the features depend on gives new entries: here the image size.
    run(compose_config([*args, f"paths.feature_cache={cache}", "dataset.image_size=40"], tmp_path / "d"))
    assert len(extractions) == 9 and len(list(cache.glob("mobilenet_v3_small-*.pt"))) == 6


def key(size: int = 4) -> dict:
    return {"backbone": "net", "split": "val", "size": size, "weights": "abc"}


def compute(size: int = 4):
    return torch.rand(size, 3), torch.arange(size)


def test_corrupt_or_stale_entries_are_rebuilt_with_a_warning(tmp_path: Path, caplog) -> None:
    x, _, hit = cached_split(tmp_path, key(), compute)
    assert not hit
    x2, _, hit = cached_split(tmp_path, key(), compute)
    assert hit and torch.equal(x, x2)
    (path,) = tmp_path.glob("net-val-*.pt")
    path.write_bytes(path.read_bytes()[:50])  # truncated
    with caplog.at_level(logging.WARNING):
        x3, _, hit = cached_split(tmp_path, key(), compute)
    assert not hit and "unreadable or stale" in caplog.text and not torch.equal(x, x3)
    entry = torch.load(path, weights_only=True)
    torch.save({**entry, "targets": entry["targets"][:2]}, path)  # an entry that does not fit its key
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, y4, hit = cached_split(tmp_path, key(), compute)
    assert not hit and "unreadable or stale" in caplog.text and len(y4) == 4


def test_concurrent_jobs_extract_once_and_never_see_half_a_file(tmp_path: Path) -> None:
    calls, results = [], []

    def slow():
        calls.append(1)
        time.sleep(0.5)
        return compute(1000)

    def job():
        results.append(cached_split(tmp_path, key(1000), slow))

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(hit for *_, hit in results) == [False, True, True, True]
    assert all(torch.equal(results[0][0], r[0]) for r in results)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [
        next(tmp_path.glob("net-val-*.pt")).name
    ]


def test_an_edited_or_moved_image_is_extracted_again(tmp_path: Path, extractions: list[int]) -> None:
    """The key covers each file's path, label, size and modification time: the cache never serves stale data."""
    from PIL import Image
    from test_image_folder import make_images

    root = make_images(tmp_path / "images", per_class=6)
    cache = tmp_path / "cache"
    args = [
        *ARGS,
        "dataset=image_folder",
        f"dataset.root={root}",
        "dataset.num_workers=0",
        f"paths.feature_cache={cache}",
    ]

    def fresh_and_cached(name: str) -> tuple[float, float]:
        """The run's result with the cache, and without it (the truth)."""
        cached = run(compose_config(args, tmp_path / f"{name}-cached"))
        plain = run(compose_config([*args, "paths.feature_cache=null"], tmp_path / f"{name}-plain"))
        return cached, plain

    run(compose_config(args, tmp_path / "first"))
    assert len(extractions) == 3
    pixels = 255 - np.asarray(Image.open(root / "cat" / "0.png"))  # inverted in place, same name
    Image.fromarray(pixels).save(root / "cat" / "0.png")
    run(compose_config(args, tmp_path / "edited"))
    assert len(extractions) == 4  # its split extracted again, the two others (unchanged) loaded

    (root / "dog" / "1.png").rename(root / "fox" / "moved.png")  # moved between classes
    before = len(extractions)
    cached, plain = fresh_and_cached("moved")
    assert len(extractions) - before >= 1 + 3 and cached == plain
