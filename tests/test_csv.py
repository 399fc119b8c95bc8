"""`dataset=csv`: a table from a CSV file (classes, real values, multi-label), its checks, and the model and task a
dataset brings (`prefers`) or refuses (`lab.choices.check_choices`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config, train

from lab.config import validate
from lab.data import build_data
from lab.errors import UserError


def write_table(path: Path, rows: int = 60, seed: int = 0) -> Path:
    """Two informative features, one noise feature; a string label, a real target, two 0/1 label columns."""
    rng = np.random.default_rng(seed)
    a, b, noise = rng.normal(size=rows), rng.normal(size=rows), rng.normal(size=rows)
    species = np.where(a + b > 0.5, "setosa", np.where(a - b > 0, "virginica", "versicolor"))
    price = 3 * a - 2 * b + 0.1 * noise + 10
    lines = ["a,b,noise,species,price,red,big"]
    for i in range(rows):
        lines.append(
            f"{a[i]:.4f},{b[i]:.4f},{noise[i]:.4f},{species[i]},{price[i]:.3f},{int(a[i] > 0)},{int(b[i] > 0)}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def csv_config(path: Path, tmp_path: Path, *overrides: str):
    path_override = [f"dataset.path={path}"] if str(path) != "." else []
    return compose_config(["dataset=csv", "model=mlp", *path_override, *overrides], tmp_path)


def test_string_labels_become_classes_in_column_order(tmp_path: Path) -> None:
    table = write_table(tmp_path / "flowers.csv")
    cfg = csv_config(table, tmp_path, "dataset.target=species", "dataset.features=[b,a]")
    assert cfg.dataset.num_classes == 3 and cfg.dataset.num_features == 2
    splits = build_data(cfg.dataset)
    assert splits.class_names == ["setosa", "versicolor", "virginica"]
    x = torch.cat([splits.train.tensors[0], splits.val.tensors[0], splits.test.tensors[0]])
    assert x.shape == (60, 2) and splits.train.tensors[1].dtype == torch.long
    source = __import__("lab.data.tabular", fromlist=["CSVTable"]).CSVTable(
        str(table), "species", ["b", "a"], 3
    )
    assert source.feature_names == ["b", "a"] and source.target_names == ["species"]
    first = table.read_text().splitlines()[1].split(",")
    assert source.data[0].tolist() == pytest.approx([float(first[1]), float(first[0])])  # b, then a


def test_a_numeric_target_with_task_regression_and_a_list_target_as_multi_hot(tmp_path: Path) -> None:
    table = write_table(tmp_path / "t.csv")
    cfg = csv_config(
        table, tmp_path, "dataset.target=price", "dataset.features=[a,b,noise]", "task=regression"
    )
    validate(cfg)
    assert cfg.dataset.num_classes is None and cfg.model.num_outputs == 1
    splits = build_data(cfg.dataset)
    y = splits.train.tensors[1]
    assert y.dtype == torch.float32 and y.ndim == 1 and 3 < float(y.mean()) < 17  # the CSV's units
    cfg = csv_config(table, tmp_path, "dataset.target=[red,big]", "dataset.features=[a,b]")
    assert cfg.dataset.num_classes == 2
    splits = build_data(cfg.dataset)
    y = splits.train.tensors[1]
    assert y.shape[1] == 2 and y.dtype == torch.float32 and set(y.unique().tolist()) == {0.0, 1.0}
    assert splits.class_names == ["red", "big"]
    with pytest.raises(UserError, match="multi-label") as e:  # cross-entropy on multi-hot vectors: never
        validate(cfg)
    assert "task" in e.value.where and "dataset" in e.value.where


def error(path: Path, tmp_path: Path, *overrides: str) -> str:
    """The one line a bad table ends in (raised by a config resolver, it arrives wrapped as on the CLI)."""
    with pytest.raises(Exception) as e:
        cfg = csv_config(path, tmp_path, *overrides)
        validate(cfg)
        build_data(cfg.dataset)
    cause = e.value
    while not isinstance(cause, UserError):
        cause = cause.__cause__ or cause.__context__
    assert "\n" not in cause.line()
    return cause.line()


def test_bad_cells_are_named_by_file_line_and_column(tmp_path: Path) -> None:
    rows = ["a,b,label", "1,2,x", "3,4,y", "5,6,x", "7,8,y"]

    def table(name: str, line: int, cells: str) -> Path:
        lines = list(rows)
        lines[line - 1] = cells
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        return tmp_path / name

    line = error(table("missing.csv", 3, "3,,y"), tmp_path, "dataset.target=label")
    assert "missing value in column 'b'" in line and "missing.csv, line 3" in line
    line = error(table("text.csv", 4, "5,six,x"), tmp_path, "dataset.target=label")
    assert "non-numeric value 'six' in column 'b'" in line and "text.csv, line 4" in line
    line = error(table("inf.csv", 5, "inf,8,y"), tmp_path, "dataset.target=label")
    assert "infinite value in column 'a'" in line and "inf.csv, line 5" in line
    line = error(
        table("nolabel.csv", 2, "1,2,"), tmp_path, "dataset.target=label"
    )  # not "set dataset.num_classes"
    assert "missing value in column 'label'" in line and "line 2" in line
    (tmp_path / "few.csv").write_text(
        "\n".join(rows[:3]) + "\n"
    )  # two rows: a test row, a val row, no training
    line = error(tmp_path / "few.csv", tmp_path, "dataset.target=label")
    assert "too few samples" in line and "split is empty" in line
    assert "column 'nope' is not in" in error(table("ok.csv", 2, "1,2,x"), tmp_path, "dataset.target=nope")
    assert "no CSV file given" in error(Path(""), tmp_path, "dataset.target=label")


def test_an_integer_target_is_classes_unless_num_classes_is_null(tmp_path: Path) -> None:
    path = tmp_path / "ages.csv"
    path.write_text("x,age\n" + "".join(f"{i},{20 + i % 7}\n" for i in range(40)))
    line = error(path, tmp_path, "dataset.target=age", "task=regression")
    assert "regression task needs real-valued targets" in line and "dataset.num_classes=null" in line
    cfg = csv_config(path, tmp_path, "dataset.target=age", "task=regression", "dataset.num_classes=null")
    validate(cfg)
    assert build_data(cfg.dataset).train.tensors[1].dtype == torch.float32


def test_dataset_csv_trains_from_the_command_line(tmp_path: Path) -> None:
    table = write_table(tmp_path / "flowers.csv", rows=120)
    run = tmp_path / "run"
    train(run, "dataset=csv", f"dataset.path={table}", "dataset.target=species", "logger=none", "monitor=none",
          "trainer.max_epochs=3", check=True)  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "success" and np.isfinite(metrics["test/loss"])
    names = json.loads((run / "class_names.json").read_text())["class_names"]
    assert names == ["setosa", "versicolor", "virginica"]


@pytest.mark.parametrize(("option", "metric"), [("diabetes", "val/mae"), ("wine", "val/acc")])
def test_a_table_brings_its_model_and_task(option: str, metric: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(run, f"dataset={option}", "logger=none", "monitor=none", *TINY, check=True)
    config = (run / ".hydra" / "overrides.yaml").read_text()
    assert "model=mlp" in config and (("task=regression" in config) == (option == "diabetes"))
    assert metric in json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (("task=regression",), ("task=regression", "dataset=digits", "real-valued")),
        (("dataset=wine", "model=simple_cnn"), ("model=simple_cnn", "dataset=wine", "dataset.channels")),
        (
            ("dataset=wine", "model=resnet18", "model.weights=null"),
            ("model=resnet18", "dataset=wine", "takes images"),
        ),
        (
            ("dataset=diabetes", "task=classification"),
            ("task=classification", "dataset=diabetes", "needs classes"),
        ),
    ],
)
def test_choices_that_cannot_work_together_fail_before_anything_is_built(
    overrides: tuple[str, ...], words: tuple[str, ...], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = train(run, *overrides, "logger=none", check=False)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and line.startswith("error: ")
    assert all(w in line for w in words), line
    assert not (run / "checkpoints").exists()
