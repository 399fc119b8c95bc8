"""Every number says where it comes from: metric names that would overwrite lab's own are refused; metrics.json
pairs val and test numbers of the same weights and names them; DDP validation counts every sample once.

Runs are real (in-process train.py); the DDP shards are built by the real loaders for ranks 0 and 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, train

from lab import checkpoint as ckpt

QUIET = ["logger=none", "monitor=none", *TINY]


@pytest.mark.parametrize("name", ["loss", "lr", "samples_per_sec"])
def test_a_metric_named_like_what_lab_logs_itself_is_refused(name: str, tmp_path: Path) -> None:
    metric = "{_target_: lab.tasks.metrics.MulticlassAccuracy, num_classes: 10}"
    proc = train(tmp_path / "run", *QUIET, f"+task.metrics.{name}={metric}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: metric name '{name}' is one lab logs itself (task.metrics.{name}): "
        f"rename the metric, e.g. task.metrics.my_{name}"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


@pytest.mark.parametrize("keep", ["checkpoint=none", "checkpoint.save_top_k=0"])
def test_without_best_weights_metrics_json_reports_the_last_ones(keep: str, tmp_path: Path) -> None:
    train(tmp_path / "run", *QUIET, keep)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["weights"] == "last, epoch 2, trained weights" and metrics["weights_epoch"] == 2
    assert metrics["best"] == metrics["val/acc"]  # the evaluated (last) weights' value, beside their test/acc
    assert "test/acc" in metrics


def test_with_ema_val_test_and_best_are_the_averages_of_best_pt(tmp_path: Path) -> None:
    train(tmp_path / "run", *QUIET, "callbacks=[default,ema]", "callbacks.ema.decay=0.5")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    epoch = ckpt.load(tmp_path / "run" / "checkpoints" / "best.pt")["epoch"]
    assert metrics["weights"] == f"best.pt, epoch {epoch}, EMA averages" and metrics["weights_epoch"] == epoch
    assert (
        metrics["best"] == metrics["val/acc"]
    )  # not the trained weights' val/acc beside the averages' test/acc


def test_ddp_evaluation_shards_hold_every_sample_exactly_once() -> None:
    """What docs/speed-and-scale.md says: validation and test under DDP count each sample once (no padding)."""
    from torch.utils.data import TensorDataset

    from lab.data.loaders import InMemoryLoader, make_dataloader

    n, ranks = 181, 2  # an odd split: shards of 91 and 90
    x, y = torch.arange(n).float().unsqueeze(1), torch.arange(n)
    for build in (
        lambda rank: InMemoryLoader(x, y, 16, shuffle=False, rank=rank, world_size=ranks),
        lambda rank: make_dataloader(
            TensorDataset(x, y), 16, False, torch.device("cpu"), 0, 0, rank=rank, world_size=ranks
        ),
    ):
        seen = [int(v) for rank in range(ranks) for _, batch_y in build(rank) for v in batch_y]
        assert sorted(seen) == list(range(n))
    docs = " ".join((ROOT / "docs" / "speed-and-scale.md").read_text().split())
    assert "twice" not in docs and "every validation and test sample exactly once" in docs
