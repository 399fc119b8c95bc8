"""Fast paths give the same results as the plain path: in-memory loader, channels_last, gradient accumulation,
bf16 autocast and torch.compile on the CPU; dataset.num_workers auto; the generated (synthetic) dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, train

from lab.config import validate
from lab.data.loaders import InMemoryLoader, default_num_workers, make_dataloader
from lab.data.synthetic import Synthetic
from lab.models.simple import MLP

MLP_NO_DROPOUT = ["model=mlp", "model.dropout=0"]


def epoch_order(loader: InMemoryLoader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [int(i) for x, _ in loader for i in x]


def make_loader(n: int = 103, batch_size: int = 10, **kwargs) -> InMemoryLoader:
    ids = torch.arange(n)  # inputs are the sample ids, so batches show which samples were drawn
    return InMemoryLoader(ids, ids.clone(), batch_size, shuffle=True, seed=7, **kwargs)


def test_in_memory_loader_visits_every_sample_once_and_reshuffles_per_epoch():
    loader = make_loader()
    first, second = epoch_order(loader, 0), epoch_order(loader, 1)
    assert sorted(first) == list(range(103)) and sorted(second) == list(range(103))
    assert first != second  # a new order every epoch
    assert epoch_order(make_loader(), 0) == first  # the same order for the same seed and epoch
    assert epoch_order(make_loader(), 1) == second
    assert len(loader) == 11


def test_in_memory_loader_matches_the_dataloader_order():
    """Both paths draw the same permutation from (seed, epoch), so they train on identical batches."""
    ids = torch.arange(50)
    dataset = torch.utils.data.TensorDataset(ids, ids.clone())
    plain = make_dataloader(dataset, 8, True, torch.device("cpu"), seed=3, num_workers=0)
    fast = InMemoryLoader(ids, ids.clone(), 8, shuffle=True, seed=3)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        fast.set_epoch(epoch)
        assert [x.tolist() for x, _ in plain] == [x.tolist() for x, _ in fast]


@pytest.mark.parametrize("world_size", [2, 3])
def test_in_memory_shards_are_disjoint_cover_everything_and_equal_in_size(world_size):
    n = 103
    shards = [epoch_order(make_loader(n, rank=r, world_size=world_size), 4) for r in range(world_size)]
    per_rank = math.ceil(n / world_size)
    assert all(len(s) == per_rank for s in shards)  # equal steps on every rank, or DDP would hang
    seen = [i for s in shards for i in s]
    assert set(seen) == set(range(n))
    assert len(seen) - len(set(seen)) == per_rank * world_size - n  # only the padding repeats samples
    unsharded = epoch_order(make_loader(n), 4)
    assert (
        shards[1][:5] == unsharded[1 : 5 * world_size : world_size]
    )  # every world_size-th of one permutation


def test_num_workers_null_means_from_the_cpu_count(tmp_path):
    from conftest import compose_config

    cfg = compose_config(["dataset.in_memory=false"], tmp_path)
    assert cfg.dataset.num_workers is None
    validate(cfg)  # null is allowed
    assert 0 <= default_num_workers() <= 8


def test_synthetic_data_has_the_requested_shape_and_is_reproducible():
    a = Synthetic(num_samples=50, channels=3, image_size=12, num_classes=4, seed=1)
    b = Synthetic(num_samples=50, channels=3, image_size=12, num_classes=4, seed=1)
    assert a.data.shape == (50, 3, 12, 12) and a.data.dtype == torch.uint8
    assert torch.equal(a.data, b.data) and torch.equal(a.targets, b.targets)
    assert set(a.targets.tolist()) <= set(range(4)) and a.classes == ["0", "1", "2", "3"]


def test_synthetic_data_trains_end_to_end(tmp_path):
    args = ["dataset=synthetic", "dataset.source.num_samples=600", "dataset.image_size=12", "model=mlp",
            "trainer.max_epochs=3", "checkpoint=none", "logger=none"]  # fmt: skip
    train(tmp_path, *args)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["val/acc"] > 0.5  # learnable: 10 classes, chance is 0.1


def final_metrics(run_dir: Path, *overrides: str) -> dict:
    train(run_dir, *TINY, "logger=none", "dataset.num_workers=0", *overrides)
    return json.loads((run_dir / "metrics.json").read_text())


def model_after(run_dir: Path, *overrides: str) -> dict[str, torch.Tensor]:
    train(run_dir, "trainer.max_epochs=1", "logger=none", "test=false", *overrides)
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_close_metrics(a: dict, b: dict, tol: float = 1e-4) -> None:
    for key in ("val/loss", "val/acc", "test/loss", "test/acc"):
        assert a[key] == pytest.approx(b[key], abs=tol), key


@pytest.fixture(scope="module")
def default_metrics(tmp_path_factory) -> dict:
    """The default path (in-memory loader, fp32, NCHW) that the other paths are compared with."""
    return final_metrics(tmp_path_factory.mktemp("default"))


def test_in_memory_path_gives_the_same_metrics_as_the_dataloader_path(tmp_path, default_metrics):
    plain = final_metrics(tmp_path, "dataset.in_memory=false")
    assert_close_metrics(default_metrics, plain)


def test_channels_last_gives_the_same_metrics(tmp_path, default_metrics):
    nhwc = final_metrics(tmp_path, "trainer.channels_last=true")
    assert_close_metrics(default_metrics, nhwc, tol=1e-3)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    big = model_after(
        tmp_path / "big", *MLP_NO_DROPOUT, "dataset.batch_size=32", "trainer.limit_train_batches=1"
    )
    accumulated = model_after(tmp_path / "acc", *MLP_NO_DROPOUT, "dataset.batch_size=16",
                              "trainer.limit_train_batches=2", "trainer.accumulate_grad_batches=2")  # fmt: skip
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_bf16_autocast_trains_on_the_cpu(tmp_path, precision):
    # Batches of 16, one validation batch, no test split: bf16 convolutions are slow on most CPUs, and only finite
    # numbers and the step count are checked.
    small = ["dataset.batch_size=16", "trainer.limit_val_batches=1", "test=false"]
    metrics = final_metrics(tmp_path, f"trainer.precision={precision}", *small)
    assert math.isfinite(metrics["val/loss"]) and metrics["global_step"] == 8


@pytest.mark.slow
def test_compile_trains_and_its_checkpoint_loads_into_a_plain_model(tmp_path):
    """torch.compile on the CPU (inductor needs the C++ compiler that is on this machine)."""
    state = model_after(tmp_path, *MLP_NO_DROPOUT, "model.hidden=16", "model.depth=1", "trainer.compile=true",
                        "trainer.limit_train_batches=3", "trainer.limit_val_batches=1")  # fmt: skip
    assert not any(key.startswith("_orig_mod") for key in state)  # the plain module's keys
    model = MLP(input_shape=(1, 8, 8), num_outputs=10, hidden=16, depth=1)
    model.load_state_dict(state)  # strict
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
