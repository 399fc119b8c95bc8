"""The task layer: classification and regression end to end, metrics and callbacks from config, errors at the edges.

Scenarios run in-process (Hydra's compose API + `lab.train.run`); the regression command also runs once through
the real CLI.
"""

from __future__ import annotations

import csv
import json
import textwrap
import traceback
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config, forked_train, train

from lab import checkpoint as ckpt
from lab.errors import UserError
from lab.train import run

QUICK = ["trainer.max_epochs=2", "trainer.progress_bar=false", "print_config=false", "logger=none"]
REGRESSION = ["task=regression", "dataset=diabetes", "model=mlp"]
F1 = (
    "+task.metrics.f1={_target_: torchmetrics.classification.MulticlassF1Score, "
    "num_classes: ${dataset.num_classes}, average: macro, validate_args: false}"
)


def train_in_process(run_dir: Path, *overrides: str, config_dir: Path | None = None) -> dict:
    """`python train.py <overrides>` in this process; returns metrics.json."""
    extra = [f"hydra.searchpath=[file://{config_dir}]"] if config_dir else []
    cfg = compose_config([*QUICK, *overrides, *extra], run_dir)
    run(cfg)
    return json.loads((run_dir / "metrics.json").read_text())


def test_regression_trains_reports_mse_mae_and_keeps_the_best_by_val_mae(tmp_path: Path) -> None:
    metrics = train_in_process(tmp_path / "run", *REGRESSION, "trainer.max_epochs=4", "logger=csv")
    assert metrics["monitor"] == "val/mae" and metrics["mode"] == "min"
    for stage in ("val", "test"):
        assert {f"{stage}/loss", f"{stage}/mse", f"{stage}/mae"} <= metrics.keys()
        assert metrics[f"{stage}/loss"] == pytest.approx(metrics[f"{stage}/mse"], rel=1e-5)  # MSE loss = MSE
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    val_mae = [float(r["val/mae"]) for r in rows if r.get("val/mae")]
    assert len(val_mae) == 4 and metrics["best"] == pytest.approx(min(val_mae))
    assert metrics["val/mae"] == pytest.approx(min(val_mae))  # evaluated on best.pt
    assert "acc" not in " ".join(metrics)  # no classification metric leaks into a regression run
    # A hand computation on best.pt: MAE of the model's predictions on the validation split.
    from hydra.utils import instantiate

    from lab.data import build_data

    cfg = compose_config([*QUICK, *REGRESSION], tmp_path / "check")
    splits = build_data(cfg.dataset)
    model = instantiate(cfg.model)
    model.load_state_dict(ckpt.load(tmp_path / "run" / "checkpoints" / "best.pt")["model"])
    x, y = splits.val.tensors
    with torch.no_grad():
        mae = (model.eval()(x).squeeze(1) - y).abs().mean().item()
    assert metrics["val/mae"] == pytest.approx(mae, rel=1e-5)


def test_regression_evaluates_a_checkpoint_with_train_false(tmp_path: Path) -> None:
    first = train_in_process(tmp_path / "run", *REGRESSION)
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    again = train_in_process(tmp_path / "eval", *REGRESSION, "train=false", f"ckpt_path={best}")
    assert again["val/mae"] == pytest.approx(first["val/mae"]) and again["test/mse"] == pytest.approx(
        first["test/mse"]
    )


def test_regression_through_the_command_line(tmp_path: Path) -> None:
    train(tmp_path / "run", *REGRESSION, "trainer.max_epochs=1", "logger=tensorboard")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "success" and metrics["monitor"] == "val/mae"
    summary = (tmp_path / "run" / "model_summary.txt").read_text()
    assert "[1, 10]" in summary  # the task's example input: one row of 10 features


def test_f1_is_one_yaml_entry_and_reaches_every_logger(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    metrics = train_in_process(run_dir, F1, "logger=many", "checkpoint.monitor=val/f1")
    assert 0 <= metrics["val/f1"] <= 1 and metrics["monitor"] == "val/f1" and "test/f1" in metrics
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert any(r.get("val/f1") for r in rows) and any(r.get("train/f1") for r in rows)
    events = EventAccumulator(str(next((run_dir / "tensorboard").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert {"val/f1", "train/f1"} <= set(events.Tags()["scalars"])
    assert metrics["best"] == pytest.approx(max(float(r["val/f1"]) for r in rows if r.get("val/f1")))


def test_an_unknown_monitor_lists_the_task_metric_names(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        train_in_process(tmp_path / "run", "checkpoint.monitor=val/f1")
    assert "checkpoint.monitor" in str(error.value) and "val/acc_top5" in str(error.value)
    with pytest.raises(UserError) as error:
        train_in_process(tmp_path / "run2", *REGRESSION, "checkpoint.monitor=val/acc")
    assert "val/mae" in str(error.value) and "val/acc," not in str(error.value)


def test_early_stopping_is_a_callback_from_config(tmp_path: Path) -> None:
    # Accuracy cannot improve by more than 1: after the first epoch no epoch counts as better.
    metrics = train_in_process(tmp_path / "run", "trainer.max_epochs=10", "callbacks.early_stopping.patience=2",
                               "callbacks.early_stopping.min_delta=1.0")  # fmt: skip
    assert metrics["epochs"] == 3 and metrics["stopped_early"] is True
    state = ckpt.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["callbacks"]["early_stopping"]["bad_validations"] == 2


CALLBACK = '''
from typing import Any

from lab import Callback


class EpochCounter(Callback):
    """Counts the epochs it sees and writes them to a file at the end."""

    def __init__(self, path: str) -> None:
        self.path, self.epochs = path, []

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.epochs.append((trainer.state.epoch, round(metrics["val/acc"], 6)))

    def on_fit_end(self, trainer: Any) -> None:
        open(self.path, "w").write(repr(self.epochs))
'''


def test_a_new_callback_is_one_class_and_one_yaml_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the README says: the class in a module of yours, the YAML file in conf/callbacks/.
    (tmp_path / "my_callbacks.py").write_text(CALLBACK)
    monkeypatch.syspath_prepend(str(tmp_path))
    conf = tmp_path / "conf"
    (conf / "callbacks").mkdir(parents=True)
    (conf / "callbacks" / "epoch_counter.yaml").write_text(
        textwrap.dedent(f"""\
        epoch_counter:
          _target_: my_callbacks.EpochCounter
          path: {tmp_path / "epochs.txt"}
        """)
    )
    metrics = train_in_process(tmp_path / "run", "callbacks=[default,epoch_counter]", config_dir=conf)
    epochs = eval((tmp_path / "epochs.txt").read_text())
    assert [e for e, _ in epochs] == [1, 2] and epochs[-1][1] == pytest.approx(metrics["val/acc"], abs=1e-6)


TABLE = """\
# scikit-learn's bundled wine table: 178 wines, 13 features, 3 cultivars.
source:
  _target_: lab.data.tabular.SklearnTable
  name: wine
name: wine
num_classes: 3
num_features: 13
input_shape: ["${dataset.num_features}"]
standardize: true
has_test_split: false
test_fraction: 0.2
val_fraction: 0.15
split_seed: 0
batch_size: 16
num_workers: null
in_memory: true
"""


def test_a_new_tabular_dataset_is_one_yaml_file(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "dataset").mkdir(parents=True)
    (conf / "dataset" / "wine.yaml").write_text(TABLE)
    metrics = train_in_process(
        tmp_path / "run", "dataset=wine", "model=mlp", "trainer.max_epochs=5", config_dir=conf
    )
    assert metrics["val/acc"] > 0.7 and "val/acc_top5" not in metrics  # 3 classes: no top-5
    names = json.loads((tmp_path / "run" / "class_names.json").read_text())["class_names"]
    assert names == ["class_0", "class_1", "class_2"]


class RaisesTypeError(torch.utils.data.Dataset):
    def __init__(self, root: str) -> None:
        raise TypeError("my dataset got a bad argument")


def test_an_error_inside_a_user_dataset_keeps_its_traceback(tmp_path: Path) -> None:
    from lab.data import build_data

    cfg = compose_config(
        ["dataset.source._target_=test_tasks.RaisesTypeError", "+dataset.source.root=x"], tmp_path
    )
    with pytest.raises(TypeError, match="my dataset got a bad argument") as error:
        build_data(cfg.dataset)
    assert not isinstance(error.value, UserError)  # raised as it was, not inside Hydra's wrapper
    frames = traceback.extract_tb(error.value.__traceback__)
    assert (
        frames[-1].filename == __file__ and frames[-1].name == "__init__"
    )  # where the user's class raised it


def test_an_error_inside_a_user_dataset_reaches_the_cli_user_with_its_traceback(tmp_path: Path) -> None:
    from conftest import cli_env

    env = cli_env(PYTHONPATH=f"{ROOT / 'src'}:{ROOT / 'tests'}")
    proc = forked_train(tmp_path / "run", "dataset.source._target_=test_tasks.RaisesTypeError",
                        "+dataset.source.root=x", env=env)  # fmt: skip
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in stderr
    # The frame of the user's own file that raised it, with its source line, then the exception itself.
    assert f'File "{__file__}", line' in stderr and 'raise TypeError("my dataset got a bad argument")' in (
        stderr
    )
    assert "TypeError: my dataset got a bad argument" in stderr
    assert "put the dataset files" not in stderr and "error: " not in stderr  # no one-line guess


def test_labels_outside_num_classes_fail_when_the_dataset_is_built(tmp_path: Path) -> None:
    from lab.data import build_data

    # Five names for five classes: the names agree, the labels (0..9) do not.
    cfg = compose_config(["dataset.num_classes=5", "+dataset.class_names=[a,b,c,d,e]"], tmp_path)
    with pytest.raises(UserError) as error:
        build_data(cfg.dataset)
    assert "dataset.num_classes" in str(error.value) and "0..9" in str(error.value)
