"""TensorBoard, CSV, `logger=many` and `logger=none` through `train.py` (in-process; the import check needs a real
process), read back from the files they write."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from conftest import TINY, cli_env, run_train, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lab.loggers import LoggerFanOut
from lab.loggers.csv import CSVLogger

# TINY: 2 epochs x 4 steps, metrics every 2 steps → train scalars at steps 2, 4, 6, 8; val at 4 and 8.
TRAIN_STEPS, VAL_STEPS = [2, 4, 6, 8], [4, 8]


@pytest.fixture(scope="module")
def many_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("many") / "run"
    train(run_dir, *TINY, "logger=many", "monitor=none")
    return run_dir


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_many_writes_tensorboard_wandb_and_csv(many_run: Path) -> None:
    assert list((many_run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((many_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (many_run / "metrics.csv").is_file()


def test_tensorboard_scalars_hparams_and_text(many_run: Path) -> None:
    acc = EventAccumulator(str(many_run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for tag in ("train/loss", "train/samples_per_sec", "train/grad_norm", "lr"):
        assert [e.step for e in acc.Scalars(tag)] == TRAIN_STEPS, tag
    # The task's train metrics are the epoch's, logged with the validation at the epoch's last step.
    for tag in ("train/acc", "train/acc_top5", "val/loss", "val/acc", "epoch", "epoch_time"):
        assert [e.step for e in acc.Scalars(tag)] == VAL_STEPS, tag
    assert [e.value for e in acc.Scalars("epoch")] == [1, 2]
    assert {"final/val/acc", "final/test/acc", "final/test/loss"} <= set(acc.Tags()["scalars"])
    # HParams tab: the flattened config with the final metrics as the metrics to compare.
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"final/val/acc", "final/test/acc"}
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["trainer.max_epochs"].number_value == 2 and hparams["model._target_"].string_value
    assert {"config/text_summary", "model_summary/text_summary"} <= set(acc.PluginTagToContent("text"))


def test_csv_has_one_row_per_logging_step(many_run: Path) -> None:
    rows = read_csv(many_run / "metrics.csv")
    assert [int(row["step"]) for row in rows] == TRAIN_STEPS
    assert all(math.isfinite(float(row["train/loss"])) for row in rows)
    # Validation metrics sit on the rows of the steps they were taken at; the others stay empty.
    assert [bool(row["val/acc"]) for row in rows] == [False, True, False, True]
    assert [row["epoch"] for row in rows if row["epoch"]] == ["1", "2"]
    assert float(rows[-1]["final/test/acc"]) >= 0


def test_none_writes_no_logger_files(tmp_outputs: Path) -> None:
    run_dir = tmp_outputs / "none"
    proc = run_train(run_dir, "debug=fast", "logger=none", env=cli_env(PYTHONPROFILEIMPORTTIME="1"))
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "wandb").exists()
    assert not (run_dir / "metrics.csv").exists() and (run_dir / "metrics.json").is_file()
    # ... and costs nothing: no logging library is even imported, nor matplotlib (for the monitor's figures, which
    # need a logger). Nor torchmetrics, on this digits run with the default model: the default metrics are lab's own.
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" in imported
    unused = {"wandb", "matplotlib", "torchmetrics"}
    assert not {m for m in imported if m.split(".")[0] in unused or "tensorboard" in m}


def test_csv_new_metric_rewrites_header_and_resume_drops_later_rows(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    logger = CSVLogger(str(path))
    fan_out = LoggerFanOut({"csv": logger})
    fan_out.log_metrics({"train/loss": 1.0}, 1)
    fan_out.log_metrics({"train/loss": 0.5}, 2)
    fan_out.log_metrics({"val/acc": 0.9}, 2)  # same step: same row
    fan_out.log_metrics({"train/loss": 0.25}, 3)
    fan_out.close()
    assert read_csv(path) == [
        {"step": "1", "train/loss": "1.0", "val/acc": ""},
        {"step": "2", "train/loss": "0.5", "val/acc": "0.9"},
        {"step": "3", "train/loss": "0.25", "val/acc": ""},
    ]
    resumed = CSVLogger(str(path))
    resumed.resume(2, {})
    resumed.log_metrics({"train/loss": 0.3}, 3)
    resumed.close()
    assert [row["train/loss"] for row in read_csv(path)] == ["1.0", "0.5", "0.3"]


def test_fan_out_skips_media_a_backend_lacks(tmp_path: Path) -> None:
    """CSV has no place for images: the fan-out's call reaches it as the Logger's no-op."""
    import torch

    fan_out = LoggerFanOut({"csv": CSVLogger(str(tmp_path / "m.csv"))})
    fan_out.log_images("train/images", torch.rand(2, 1, 8, 8), 0)
    fan_out.log_histogram("weights/w", torch.rand(5), 0)
    fan_out.close()
    assert not (tmp_path / "m.csv").exists()


def test_tensorboard_histogram_summarises_the_values_exactly(tmp_path: Path) -> None:
    import torch

    from lab.loggers.tensorboard import TensorBoardLogger

    values = torch.cat([torch.zeros(30), torch.ones(10), torch.full((5,), -2.0)])
    logger = TensorBoardLogger(str(tmp_path))
    logger.log_histogram("weights/w", values, 7)
    logger.close()
    [event] = (
        EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload().Histograms("weights/w")
    )
    histogram = event.histogram_value
    assert event.step == 7 and (histogram.min, histogram.max, histogram.num) == (-2.0, 1.0, 45)
    assert histogram.sum == pytest.approx(float(values.sum())) and histogram.sum_squares == pytest.approx(
        30.0
    )
    assert sum(histogram.bucket) == 45 and histogram.bucket_limit[-1] == pytest.approx(1.0)
    assert histogram.bucket[0] == 5 and histogram.bucket[-1] == 10  # -2 in the first bucket, 1 in the last


def test_histograms_in_one_call_and_native_checksums_read_back(tmp_path: Path) -> None:
    import os

    import torch
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    from tensorboard.summary.writer import record_writer

    from lab.loggers.tensorboard import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path))
    logger.log_histograms({"weights/a": torch.arange(4.0), "grads/a": torch.ones(3), "weights/empty": torch.ones(0)},
                          3)  # fmt: skip
    logger.close()
    # The writer checksummed with the C CRC-32C; TensorBoard's reader checks every record with its own.
    assert record_writer.masked_crc32c is not masked_crc32c
    for data in (b"", b"x", os.urandom(4096)):
        assert record_writer.masked_crc32c(data) == masked_crc32c(data)
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    assert sorted(events.Tags()["histograms"]) == ["grads/a", "weights/a"]  # an empty tensor has no histogram
    [a] = events.Histograms("weights/a")
    assert (a.step, a.histogram_value.num, a.histogram_value.sum, a.histogram_value.max) == (3, 4, 6.0, 3.0)
    [g] = events.Histograms("grads/a")
    assert (g.histogram_value.min, g.histogram_value.max, g.histogram_value.num) == (1.0, 1.0, 3)
