"""TensorBoard and logs that read well: train+val on one chart, per-epoch histograms, a short HParams table,
legible image grids, and log lines instead of tqdm frames when output is not a terminal. Event files read back."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from conftest import TINY, compose_config, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from lab.progress import LogProgress, progress
from lab.train import run


def events(run_dir: Path) -> EventAccumulator:
    guidance = {"scalars": 0, "tensors": 0, "histograms": 0, "images": 0}
    return EventAccumulator(str(run_dir / "tensorboard"), size_guidance=guidance).Reload()


def hparams(acc: EventAccumulator) -> dict:
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return dict(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tb")
    # Histograms every 50 steps, but only 4 steps an epoch: still one set per epoch.
    run(compose_config([*TINY, "monitor.histograms.every_n_steps=50", "print_config=false",
                        "trainer.progress_bar=false"], out))  # fmt: skip
    return out


def test_train_and_val_share_a_chart(tb_run: Path) -> None:
    acc = events(tb_run)
    [event] = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["loss"] == [r"^(train|val)/loss$"] and charts["acc"] == [r"^(train|val)/acc$"]
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "val/loss", "train/acc", "val/acc"} <= set(tags)  # what the charts' regexes match


def test_short_runs_get_histograms_each_epoch(tb_run: Path) -> None:
    acc = events(tb_run)
    assert [e.step for e in acc.Histograms("weights/head.1.weight")] == [4, 8]  # each epoch's last step
    assert [e.step for e in acc.Histograms("grads/head.1.weight")] == [4, 8]


def test_small_images_are_upscaled(tb_run: Path) -> None:
    [image] = events(tb_run).Images("train/images")
    assert image.height >= 64 * 4 and image.width >= 64 * 4  # a grid of 32 digits of 8×8 px, 8× larger


def test_hparams_table_leads_with_what_distinguishes_runs(tb_run: Path, tmp_path: Path) -> None:
    table = hparams(events(tb_run))
    assert {"model._target_", "optimizer.lr", "dataset.batch_size", "dataset.name"} <= set(table)
    assert not [k for k in table if k.startswith(("paths.", "checkpoint.", "logger.", "hydra"))]
    assert len(table) <= 12
    run_dir = tmp_path / "cli"  # through Hydra: the overridden keys and the group choices
    proc = train(run_dir, *TINY, "optimizer=adamw", "optimizer.weight_decay=0.05", "model.dropout=0.2",
                     "trainer.progress_bar=true")  # fmt: skip
    table = hparams(events(run_dir))
    assert table["optimizer"].string_value == "adamw" and table["model"].string_value == "simple_cnn"
    assert table["model.dropout"].number_value == pytest.approx(0.2)
    assert table["optimizer.weight_decay"].number_value == pytest.approx(0.05)
    assert "checkpoint.dirpath" not in table
    # progress_bar=true with stderr not a terminal: no tqdm carriage-return frames
    assert "\r" not in proc.stderr and "it/s]" not in proc.stderr


def test_progress_is_log_lines_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(progress(range(3), 3, stream=io.StringIO()), LogProgress)

    class Terminal(io.StringIO):  # stands in for a terminal: tqdm is chosen
        def isatty(self) -> bool:
            return True

    assert not isinstance(progress(range(3), 3, stream=Terminal()), LogProgress)
    bar = LogProgress(range(4), total=4, desc="epoch 1", every_s=0)
    with caplog.at_level(logging.INFO, logger="lab.progress"):
        for i in bar:
            bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and lines[1].startswith("epoch 1: 2/4 (50%) ") and lines[1].endswith("loss=0.500")
    assert " it/s eta 0:" in lines[0]
