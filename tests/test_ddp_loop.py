"""The loop under DistributedDataParallel, 2 gloo ranks forked as torchrun starts them (`tests/ddp_loop.py`):
accumulation with `no_sync` equals one process with the global batch, a NaN on one rank skips the step on both,
throughput counts every rank's samples, BatchNorm statistics and EMA averages agree on every rank, and a stop
signal on one rank stops both after the same step."""

from __future__ import annotations

import itertools
import signal

import ddp_loop
import pytest
import torch
from conftest import forked_ranks


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_loop")
    forked_ranks("tests/ddp_loop.py", [str(out)])
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.mark.slow
def test_two_ranks_accumulating_two_batches_equal_one_process_with_the_global_batch(
    ranks: list[dict],
) -> None:
    torch.set_num_threads(1)
    single = ddp_loop.accumulation(None, 0, 1, batch_size=16, accumulate=1)
    for rank in ranks:
        run = rank["accumulation"]
        assert run["steps"] == single["steps"] == 8
        # One all-reduce of the gradients per optimizer step (the tiny model is one bucket): the first batch of
        # each window ran under no_sync.
        assert run["reductions"] == run["steps"]
        for name, value in single["model"].items():
            # Tolerance: the same sums in another order (float32), over 8 steps of SGD.
            torch.testing.assert_close(run["model"][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_throughput_counts_the_samples_of_every_rank(ranks: list[dict]) -> None:
    run = ranks[0]["accumulation"]
    logged = run["logged"]
    assert len(logged) == 4  # 4 steps an epoch, logged every 2 steps, 2 epochs
    ratios = []
    for (t0, step0, _), (t1, step1, metrics) in itertools.pairwise(logged):
        if step1 - step0 == 2 and step1 % 4 == 0:  # two windows of the same epoch
            ratios.append(metrics["train/samples_per_sec"] * (t1 - t0) / run["local_samples"])
    # Samples per second x the window's seconds = the samples both ranks trained on (one rank's alone: 1).
    assert ratios and all(1.6 < ratio < 2.4 for ratio in ratios), ratios


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_on_both(ranks: list[dict]) -> None:
    for rank in ranks:
        assert rank["nan"]["skipped"] == 1 and rank["nan"]["steps"] == 4
        assert all(torch.isfinite(t).all() for t in rank["nan"]["model"].values())
    for name, value in ranks[0]["nan"]["model"].items():
        assert torch.equal(ranks[1]["nan"]["model"][name], value), name


@pytest.mark.slow
def test_every_rank_ends_with_the_same_batchnorm_statistics_ema_and_validation(ranks: list[dict]) -> None:
    first, second = (rank["batchnorm"] for rank in ranks)
    assert any("running_mean" in name for name in first["model"])  # the model has BatchNorm
    for part in ("model", "ema"):
        assert first[part].keys() == second[part].keys()
        for name, value in first[part].items():
            assert torch.equal(second[part][name], value), (part, name)
    assert first["val"] == second["val"]


@pytest.mark.slow
def test_a_stop_signal_on_one_rank_stops_every_rank_after_the_same_step(ranks: list[dict]) -> None:
    first, second = (rank["signal"] for rank in ranks)
    assert first["stopped_by"] == second["stopped_by"] == signal.SIGTERM
    assert first["steps"] == second["steps"] == 2
    for name, value in first["model"].items():
        assert torch.equal(second["model"][name], value), name
