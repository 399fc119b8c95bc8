"""`python train.py` end to end: the run folder, checkpoints, TensorBoard, metrics. The tiny run is a real CLI
process (the one for `train`); the other scenarios run the same command line in-process (`conftest.train`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_train, train
from hydra.utils import instantiate
from omegaconf import OmegaConf

METRIC_TAGS = {
    "train/loss",
    "train/acc",
    "val/loss",
    "val/acc",
    "lr",
    "train/samples_per_sec",
    "train/grad_norm",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    run_train(run_dir, *TINY, "trainer.deterministic=true")
    return run_dir


def test_run_folder_layout(tiny_run: Path) -> None:
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "model_summary.txt", "metrics.json",
                 "run_info.json", "checkpoints/last.pt", "checkpoints/best.pt"):  # fmt: skip
        assert (tiny_run / name).is_file(), name
    assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))
    summary = (tiny_run / "model_summary.txt").read_text()
    assert "SimpleCNN" in summary and "Trainable params" in summary
    assert "epoch 2/2" in (tiny_run / "train.log").read_text()


def test_metrics_json(tiny_run: Path) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for key in ("val/acc", "val/loss", "test/acc", "test/loss"):
        assert 0 <= metrics[key] < 10, key
    assert metrics["monitor"] == "val/acc" and metrics["epochs"] == 2 and metrics["status"] == "success"
    assert metrics["best"] == pytest.approx(metrics["val/acc"])  # final val eval uses best.pt
    assert metrics["global_step"] == 2 * 4


def test_run_info_records_code_and_package_versions(tiny_run: Path) -> None:
    info = json.loads((tiny_run / "run_info.json").read_text())
    for package in ("torch", "torchvision", "hydra-core", "omegaconf"):
        assert info["versions"][package], package
    assert "git_commit" in info and "git_dirty" in info and info["command"]


def test_checkpoint_contents_and_reload(tiny_run: Path) -> None:
    state = torch.load(tiny_run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "epoch",
        "global_step",
        "monitor",
        "config",
        "rng",
        "class_names",
    ):
        assert key in state, key
    assert state["epoch"] == 2 and state["global_step"] == 8
    assert state["monitor"]["name"] == "val/acc" and state["monitor"]["mode"] == "max"
    assert state["class_names"] == [str(i) for i in range(10)]
    config = OmegaConf.create(state["config"])
    model = instantiate(config.model)
    model.load_state_dict(state["model"])  # a plain state_dict
    model.eval()
    fresh = instantiate(config.model).eval()
    x = torch.randn(4, 1, 8, 8)
    assert not torch.allclose(model(x), fresh(x))
    fresh.load_state_dict(state["model"])
    assert torch.equal(model(x), fresh(x))


def test_tensorboard_events_have_metrics_and_hparams(tiny_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(
        str(tiny_run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0}
    ).Reload()
    tags = set(events.Tags()["scalars"])
    assert tags >= METRIC_TAGS, METRIC_TAGS - tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]  # log_every_n_steps=2
    assert [e.step for e in events.Scalars("val/acc")] == [4, 8]  # once per epoch
    content = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["optimizer.lr"].number_value == pytest.approx(1e-3)
    assert hparams["model._target_"].string_value == "lab.models.simple.SimpleCNN"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metric_tags = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"final/test/acc", "final/val/acc"} <= metric_tags
    assert {"final/test/acc", "final/val/acc"} <= tags
    assert "config/text_summary" in events.Tags()["tensors"]


def test_same_seed_deterministic_runs_are_identical(tiny_run: Path, tmp_path: Path) -> None:
    train(tmp_path / "again", *TINY, "trainer.deterministic=true")
    first = json.loads((tiny_run / "metrics.json").read_text())
    second = json.loads((tmp_path / "again" / "metrics.json").read_text())
    for key in ("val/acc", "val/loss", "test/acc", "test/loss"):
        assert first[key] == second[key], key


def test_evaluate_only_from_a_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    best = tiny_run / "checkpoints" / "best.pt"
    train(tmp_path / "eval", "train=false", f"ckpt_path={best}")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    trained = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["test/acc"] == pytest.approx(trained["test/acc"])
    assert metrics["val/loss"] == pytest.approx(trained["val/loss"], rel=1e-5)
    assert not (tmp_path / "eval" / "checkpoints").exists()


def test_default_run_reaches_95_percent_test_accuracy(tmp_path: Path) -> None:
    """The README's promise: plain `python train.py` (only the run dir moved) gets >= 0.95 on digits."""
    train(tmp_path / "default")
    metrics = json.loads((tmp_path / "default" / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.95 and metrics["epochs"] == 10


@pytest.mark.parametrize("overrides", [["experiment=example"], ["model=mlp", "optimizer=sgd", "scheduler=cosine"],
                                       ["scheduler=onecycle", "logger=csv"], ["debug=fast"]])  # fmt: skip
def test_other_configurations_train(overrides: list[str], tmp_path: Path) -> None:
    train(tmp_path / "run", *TINY, *overrides)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "success"
    if "logger=csv" in overrides or "experiment=example" in overrides:
        assert (tmp_path / "run" / "metrics.csv").is_file()
