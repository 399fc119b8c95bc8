"""Everything `conf/monitor` turns on, read back from the TensorBoard event files of a real training run."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import TINY, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lab import monitor
from lab.monitor import confusion_matrix, predictions_figure


def events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(
        str(log_dir), size_guidance={"images": 0, "histograms": 0, "tensors": 0, "scalars": 0}
    )
    return acc.Reload()


# TINY's four steps in one epoch, for the runs whose tests count no epochs.
ONE_EPOCH = [*TINY, "trainer.max_epochs=1"]
# The titles of the confusion-matrix figures the full run draws, in order.
FULL_RUN_TITLES: list[str] = []


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("monitor") / "run"
    real = monitor.confusion_figure
    with mock.patch.object(
        monitor, "confusion_figure", lambda m, n, title="": FULL_RUN_TITLES.append(title) or real(m, n, title)
    ):
        train(
            run_dir, *TINY, "monitor=full", "monitor.histograms.every_n_steps=2", "monitor.embedding.count=40"
        )
    return run_dir


def test_media_of_a_full_run(full_run: Path) -> None:
    acc = events(full_run / "tensorboard")
    tags = acc.Tags()
    # Model graph, once.
    assert tags["graph"] and any("Conv2d" in node.name for node in acc.Graph().node)
    # Image grid of a training batch once; a predictions figure per epoch; confusion matrices on val and test.
    assert len(acc.Images("train/images")) == 1
    assert [e.step for e in acc.Images("val/predictions")] == [4, 8]  # 2 epochs of 4 steps
    assert len(acc.Images("val/confusion_matrix")) == 2  # each epoch
    # At the end, on the evaluated weights: tagged apart from the epochs' figures.
    assert (
        len(acc.Images("final/val/confusion_matrix")) == 1
        and len(acc.Images("final/test/confusion_matrix")) == 1
    )
    # Histograms of every parameter and its gradient, every 2 steps over 8 steps.
    assert {e.step for e in acc.Histograms("weights/features.0.0.weight")} == {2, 4, 6, 8}
    assert len(acc.Histograms("grads/head.1.weight")) == 4
    # One PR curve per class (digits: 10) on val and test.
    pr = acc.PluginTagToContent("pr_curves")
    assert {f"final/val/pr_curve/{c}" for c in range(10)} <= set(pr) and "final/test/pr_curve/9" in pr
    # Text: resolved config and model summary.
    assert {"config/text_summary", "model_summary/text_summary"} <= set(acc.PluginTagToContent("text"))
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "max_epochs: 2" in config_text
    # Top-5 accuracy appears because digits has more than 5 classes.
    assert len(acc.Scalars("val/acc_top5")) == 2


def test_embedding_projector(full_run: Path) -> None:
    log_dir = full_run / "tensorboard"
    config = (log_dir / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "final/val/features:00008"' in config and "sprite" in config
    folder = log_dir / "00008" / "final%2fval%2ffeatures"
    rows = (folder / "tensors.tsv").read_text().strip().splitlines()
    assert len(rows) == 40 and len(rows[0].split("\t")) == 64  # SimpleCNN width 32 → 64 penultimate features
    labels = (folder / "metadata.tsv").read_text().split()
    assert len(labels) == 40 and set(labels) <= {str(c) for c in range(10)}
    assert (folder / "sprite.png").stat().st_size > 0


def test_default_monitor_is_light(tmp_outputs: Path) -> None:
    """Defaults: graph, image grid, histograms, PR curves at the end; no figures, so no matplotlib import."""
    run_dir = tmp_outputs / "default"
    train(run_dir, *ONE_EPOCH, "monitor.histograms.every_n_steps=2")
    acc = events(run_dir / "tensorboard")
    assert acc.Tags()["graph"] and acc.Tags()["images"] == ["train/images"]
    assert len(acc.Histograms("weights/head.1.bias")) == 2
    assert len(acc.PluginTagToContent("pr_curves")) == 20
    assert not (run_dir / "tensorboard" / "projector_config.pbtxt").exists()


def test_evaluation_only_run_logs_the_end_of_training_media(full_run: Path, tmp_outputs: Path) -> None:
    run_dir = tmp_outputs / "eval"
    best = full_run / "checkpoints" / "best.pt"
    train(run_dir, "train=false", f"ckpt_path={best}", "monitor=full", "monitor.embedding.count=10")
    acc = events(run_dir / "tensorboard")
    assert {"final/val/confusion_matrix", "final/test/confusion_matrix"} <= set(acc.Tags()["images"])
    assert {"final/val/pr_curve/0", "final/test/pr_curve/9"} <= set(acc.PluginTagToContent("pr_curves"))
    assert (run_dir / "tensorboard" / "projector_config.pbtxt").is_file()


def test_monitor_none_logs_only_scalars_and_text(tmp_outputs: Path) -> None:
    run_dir = tmp_outputs / "none"
    train(run_dir, *ONE_EPOCH, "monitor=none", "test=false")
    tags = events(run_dir / "tensorboard").Tags()
    assert not tags["graph"] and not tags["images"] and not tags["histograms"]
    assert "train/loss" in tags["scalars"]


def test_final_figures_name_the_weights_they_show(full_run: Path) -> None:
    """The final confusion matrix is drawn on the weights metrics.json reports, and its title says which."""
    weights = json.loads((full_run / "metrics.json").read_text())["weights"]
    assert weights.startswith("best.pt, epoch ") and weights.endswith("trained weights")
    assert FULL_RUN_TITLES[-2:] == [f"val, {weights}: 144 samples", f"test, {weights}: 359 samples"]
    assert FULL_RUN_TITLES[0] == "val, epoch 1: 144 samples"


def test_confusion_matrix_counts() -> None:
    preds, targets = torch.tensor([0, 1, 1, 2, 2, 2]), torch.tensor([0, 1, 2, 2, 2, 0])
    assert confusion_matrix(preds, targets, 3).tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]


def test_predictions_figure_titles_green_when_right_red_when_wrong() -> None:
    images = torch.rand(3, 1, 8, 8)
    figure = predictions_figure(images, torch.tensor([1, 2, 0]), torch.tensor([1, 0, 0]), ["a", "b", "c"])
    titles = [ax.title for ax in figure.axes if ax.get_title()]
    assert [t.get_text() for t in titles] == ["b\n(true: b)", "c\n(true: a)", "a\n(true: a)"]
    assert [t.get_color() for t in titles] == ["green", "red", "green"]


@pytest.mark.slow
def test_under_ddp_the_final_figures_cover_the_whole_split(tmp_path: Path) -> None:
    """Two CPU ranks (gloo, forked as torchrun starts them): each evaluates half of val; the figures hold all 144
    samples."""
    from test_ddp import forked_ddp, only_run_dir

    forked_ddp(tmp_path, "trainer.max_epochs=1", "trainer.limit_train_batches=1", "logger=tensorboard", "monitor=full",
               "monitor.embedding.count=1000", "model=simple_cnn", "dataset.batch_size=32")  # fmt: skip
    log_dir = only_run_dir(tmp_path) / "tensorboard"
    acc = events(log_dir)
    for stage, size in (("val", 144), ("test", 359)):  # digits' splits
        (curve,) = acc.Tensors(f"final/{stage}/pr_curve/3")
        counts = torch.tensor(curve.tensor_proto.float_val).view(6, -1)  # TP, FP, TN, FN, precision, recall
        assert int(counts[:4, 0].sum()) == size  # every sample once, from both ranks
    (folder,) = [p for p in log_dir.iterdir() if p.is_dir() and (p / "final%2fval%2ffeatures").is_dir()]
    assert len((folder / "final%2fval%2ffeatures" / "tensors.tsv").read_text().strip().splitlines()) == 144
