"""Augmentation presets (`augment=<preset>`): torchvision v2 transforms on each training image, never on val/test.
Scenarios run in-process (Hydra's compose API + `lab.train.run`)."""

from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from test_recipes import QUICK, train_in_process

from lab.train import main

PRESETS = ["trivial", "randaugment", "autoaugment", "crop_flip", "erasing"]


def loaders_for(run_dir: Path, *overrides: str) -> dict:
    """The loaders `lab.train.build` makes for these overrides (the `train` one wrapped when augmenting)."""
    from lab.train import build

    return build(compose_config([*QUICK, *overrides], run_dir)).trainer.loaders


def first_batch(loader) -> torch.Tensor:
    return next(iter(loader))[0]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The loaders without augment, built once for every preset: their batches draw nothing from the RNG, and
    their order depends on the seed and epoch alone, so each test reads the same batches from them."""
    return loaders_for(tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_trains_and_changes_training_batches_only(
    tmp_path: Path, preset: str, plain: dict
) -> None:
    metrics = train_in_process(tmp_path / "run", f"augment={preset}")
    assert metrics["status"] == "success" and 0 <= metrics["val/acc"] <= 1

    augmented = loaders_for(tmp_path / "aug", f"augment={preset}")
    raw, aug = first_batch(plain["train"]), first_batch(augmented["train"])
    assert raw.shape == aug.shape and raw.dtype == aug.dtype
    changed = (raw - aug).abs().flatten(1).amax(1) > 1e-4  # per image
    assert changed.any(), f"{preset} left every training image as it was"
    for stage in ("val", "test"):
        assert all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            for a, b in zip(plain[stage], augmented[stage], strict=True)
        )


def test_same_seed_same_augmented_batch(tmp_path: Path) -> None:
    # trainer.seed seeds torch's global RNG in build(): the same seed gives the same augmented batch.
    same = [first_batch(loaders_for(tmp_path / f"s{i}", "augment=crop_flip")["train"]) for i in range(2)]
    assert torch.equal(same[0], same[1])
    # Same data order, another RNG state: other crops and flips (the draws come from the global RNG).
    loader = loaders_for(tmp_path / "other", "augment=crop_flip")["train"]
    torch.manual_seed(123)
    assert not torch.equal(first_batch(loader), same[0])


def test_unnormalise_round_trip_and_per_image_draws() -> None:
    from torchvision.transforms import v2

    from lab.data.augment import BatchAugment

    mean, std = [0.3053], [0.3761]
    images = torch.rand(16, 1, 8, 8)
    x = (images - mean[0]) / std[0]
    flip = BatchAugment(v2.RandomHorizontalFlip(p=0.5), mean, std)
    torch.manual_seed(1)
    out = flip(x)
    flipped = [torch.allclose(o, xi.flip(-1), atol=1e-5) for o, xi in zip(out, x, strict=True)]
    kept = [torch.allclose(o, xi, atol=1e-5) for o, xi in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)  # each image draws its own coin, not one for the batch


def test_augment_runs_on_the_dataloader_path_and_turns_cache_auto_off(tmp_path: Path, caplog) -> None:
    metrics = train_in_process(
        tmp_path / "dl", "augment=trivial", "dataset.in_memory=false", "dataset.num_workers=0"
    )
    assert metrics["status"] == "success"
    with caplog.at_level(logging.INFO, logger="lab"):
        metrics = train_in_process(tmp_path / "frozen", "augment=crop_flip", "model=resnet18_frozen",
                                   "model.weights=null", "dataset.image_size=32", "monitor=none",
                                   "trainer.limit_train_batches=2", "trainer.limit_val_batches=2")  # fmt: skip
    assert metrics["status"] == "success"
    assert "model.cache_features=auto: off, since augment changes the images of every batch" in caplog.text


def refusal(tmp_path: Path, capsys, *overrides: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(compose_config([*QUICK, *overrides], tmp_path))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_tables_and_cached_features_are_refused_with_one_line(tmp_path: Path, capsys) -> None:
    line = refusal(tmp_path / "t", capsys, "dataset=wine", "model=mlp", "augment=trivial")
    assert line.startswith(
        "error: augment presets transform images (C, H, W); wine's inputs are [13] (augment):"
    )
    line = refusal(tmp_path / "c", capsys, "augment=erasing", "model=resnet18_frozen", "model.weights=null",
                   "dataset.image_size=32", "model.cache_features=true")  # fmt: skip
    assert line == (
        "error: cannot cache features: augment augments the images of every batch (model.cache_features): "
        "use model.cache_features=auto or false, or leave augment unset"
    )


def test_resuming_mid_epoch_draws_what_the_uninterrupted_epoch_drew(tmp_path: Path) -> None:
    loader = loaders_for(tmp_path / "r", "augment=trivial")["train"]
    torch.manual_seed(7)
    full = list(loader.batches(0, 4))
    torch.manual_seed(7)
    list(loader.batches(0, 2))
    state = torch.get_rng_state()  # what last.pt saves after batch 2
    torch.manual_seed(99)  # a fresh process
    torch.set_rng_state(state)
    resumed = list(loader.batches(2, 4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[2:], resumed, strict=True))
    torch.set_rng_state(state)  # skipping by augmenting and dropping would draw for the skipped batches
    naive = list(islice(loader, 2, 4))
    assert not torch.equal(naive[0][0], full[2][0])
