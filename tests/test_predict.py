"""`predict.py` and the export answer what the task predicts, from raw inputs, in the user's units.

Image folders of generated PNGs, scikit-learn's wine (classification) and diabetes (regression) tables, and a
multi-label table defined here (`MultiHotWine`), each trained in-process; predict.py runs through its real CLI
(in-process, and once as a subprocess); the ONNX model runs in onnxruntime.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import ROOT, cli_env, compose_config, in_process, train
from test_image_folder import make_images

from lab import checkpoint as ckpt
from lab.errors import UserError
from lab.export import export
from lab.predict import load_model, predict
from lab.train import run

QUICK = ["trainer.max_epochs=2", "trainer.progress_bar=false", "print_config=false", "logger=none"]


def test_train_on_image_folder_then_predict(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=12)
    train(tmp_path / "run", "dataset=image_folder", f"dataset.root={root}", "dataset.num_workers=0", "dataset.batch_size=8",
              "model=resnet18_frozen", "model.weights=null", "dataset.image_size=32", "trainer.max_epochs=3",
              "optimizer.lr=0.01", f"paths.feature_cache={tmp_path / 'features'}")  # fmt: skip
    assert json.loads((tmp_path / "run/class_names.json").read_text())["class_names"] == ["cat", "dog", "fox"]
    ckpt_path = tmp_path / "run/checkpoints/best.pt"

    result = predict(ckpt_path, root, device="cpu")
    assert len(result.names) == 36 and result.columns == ["cat", "dog", "fox"]
    assert all(sum(row) == pytest.approx(1.0, abs=1e-5) for row in result.values)  # softmax probabilities
    correct = sum(
        label == Path(path).parent.name for path, label in zip(result.names, result.labels, strict=True)
    )
    assert correct > 36 // 3  # better than chance: the colour is learnable even by a random-init backbone

    out = tmp_path / "predictions.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "predict.py"), f"ckpt_path={ckpt_path}",
                           f"inputs={root / 'dog' / '0.png'}", "top_k=3", f"output={out}"],
                          capture_output=True, text=True, env=cli_env(), timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    path, top = proc.stdout.strip().splitlines()[0].split("\t")
    assert path.endswith("0.png") and sorted(top.split()[::2]) == ["cat", "dog", "fox"]
    (row,) = list(csv.DictReader(out.open()))
    assert list(row) == ["input", "cat", "dog", "fox", "prediction"] and row["input"].endswith("0.png")
    index = result.names.index(row["input"])
    assert [float(row[c]) for c in result.columns] == pytest.approx(result.values[index], abs=1e-5)
    assert row["prediction"] == result.labels[index]


def test_predict_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="ckpt_path"):
        predict(tmp_path / "missing.pt", tmp_path)
    proc = in_process("predict.py", ["inputs=x.png"])
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: missing argument (ckpt_path): python predict.py ckpt_path=<best.pt> inputs=<image|folder|table.csv>"
    )


class MultiHotWine(torch.utils.data.Dataset):
    """Wine's rows with three labels each: cultivar 0, cultivar 1, and more alcohol than the median (any mix)."""

    classes = ("cultivar_0", "cultivar_1", "strong")

    def __init__(self) -> None:
        from lab.data.tabular import SklearnTable

        wine = SklearnTable("wine")
        self.data, self.feature_names = wine.data, wine.feature_names
        alcohol = wine.data[:, 0]
        self.targets = torch.stack(
            [wine.targets == 0, wine.targets == 1, alcohol > alcohol.median()], dim=1
        ).float()

    def __len__(self) -> int:
        return len(self.targets)


MULTILABEL = ["task=multilabel", "dataset=wine", "model=mlp", "dataset.source._target_=test_predict.MultiHotWine",
              "~dataset.source.name", "trainer.max_epochs=4"]  # fmt: skip
TABLES = {
    "classification": (["dataset=wine", "model=mlp"], "wine"),
    "regression": (["task=regression", "dataset=diabetes", "model=mlp"], "diabetes"),
    "multilabel": (MULTILABEL, None),
}


@pytest.fixture(scope="module")
def table_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`table_run(task)`: the run directory of TABLES[task] trained with TensorBoard and monitor=full, trained once
    in this module (the test of a bad table row reads the classification run too)."""
    runs: dict[str, Path] = {}

    def trained(task: str) -> Path:
        if task not in runs:
            overrides, _ = TABLES[task]
            run_dir = tmp_path_factory.mktemp(task) / "run"
            run(compose_config([*QUICK, *overrides, "logger=tensorboard", "monitor=full"], run_dir))
            runs[task] = run_dir
        return runs[task]

    return trained


@pytest.mark.parametrize("task", list(TABLES))
def test_table_rows_give_the_same_numbers_from_best_pt_model_pt_and_onnx(
    task: str, table_run: Callable[[str], Path], tmp_path: Path
) -> None:
    """A CSV as the table holds it (target column included, columns in another order) → the same predictions
    from predict.py on best.pt and on export/model.pt and from onnxruntime; monitor=full draws what applies."""
    from lab.data.tabular import SklearnTable

    overrides, table = TABLES[task]
    run_dir = table_run(task)
    best = run_dir / "checkpoints" / "best.pt"
    source = SklearnTable(table) if table else MultiHotWine()
    raw, names = source.data[:5], source.feature_names
    rows = tmp_path / "rows.csv"
    with rows.open("w", newline="") as f:  # the target first, then the features in reverse order
        writer = csv.writer(f)
        writer.writerow(["target", *reversed(names)])
        for x, y in zip(raw.tolist(), source.targets[:5].tolist(), strict=True):
            writer.writerow([y if not isinstance(y, list) else 0, *reversed(x)])

    out = export(best, ["state_dict", "onnx"], tmp_path / "export")
    from_best, from_export = predict(best, rows, device="cpu"), predict(out / "model.pt", rows, device="cpu")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (from_onnx,) = session.run(["predictions"], {"input": raw.numpy()})
    assert from_best.names == ["2", "3", "4", "5", "6"]  # line numbers in the file
    torch.testing.assert_close(torch.tensor(from_export.values), torch.tensor(from_best.values))
    torch.testing.assert_close(torch.tensor(from_onnx), torch.tensor(from_best.values), atol=1e-5, rtol=1e-4)

    # What lab computed in training: the model on z-scores with the training split's statistics, then the task's
    # edge (softmax; sigmoid; the target's standardisation undone).
    state = ckpt.load(best)
    record = state["preprocess"]
    model, _, _ = load_model(best, "cpu")
    with torch.no_grad():
        outputs = model((raw - torch.tensor(record["mean"])) / torch.tensor(record["std"]))
    if task == "classification":
        expected = outputs.softmax(1)
        assert from_best.labels == [from_best.columns[i] for i in expected.argmax(1).tolist()]
    elif task == "multilabel":
        expected = outputs.sigmoid()
        above = [
            [c for c, p in zip(from_best.columns, row, strict=True) if p >= 0.5] for row in expected.tolist()
        ]
        assert from_best.columns == list(MultiHotWine.classes) and from_best.labels == [
            ";".join(a) for a in above
        ]
    else:
        expected = outputs * torch.tensor(record["target_std"]) + torch.tensor(record["target_mean"])
        assert (
            from_best.columns == ["target"] and 50 < record["target_mean"][0] < 250
        )  # the target's own units
    torch.testing.assert_close(torch.tensor(from_best.values), expected)

    # The statistics are the training split's, not the whole table's.
    from lab.data import build_data

    splits = build_data(compose_config([*QUICK, *overrides], tmp_path).dataset)
    assert record["mean"] == splits.extra["standardize"]["mean"] and record["feature_names"] == names
    assert record["mean"] != pytest.approx(source.data.mean(0).tolist(), rel=1e-6)
    if task == "regression":
        train_y = splits.train.tensors[1]
        assert float(train_y.mean()) == pytest.approx(0, abs=1e-5) and float(train_y.std()) == pytest.approx(
            1
        )
        assert float(splits.test.tensors[1].mean()) != pytest.approx(
            0, abs=1e-3
        )  # test rows not in the stats
        raw_train = train_y * record["target_std"][0] + record["target_mean"][0]
        assert record["target_mean"][0] == pytest.approx(float(raw_train.mean()), rel=1e-5)

    # predict.py through its command line: one CSV row per input.
    written = tmp_path / "out.csv"
    proc = in_process("predict.py", [f"ckpt_path={out / 'model.pt'}", f"inputs={rows}", f"output={written}"])
    assert proc.returncode == 0, proc.stderr
    lines = list(csv.reader(written.open()))
    label = {"classification": ["prediction"], "multilabel": ["labels"], "regression": []}[task]
    assert lines[0] == ["input", *from_best.columns, *label] and len(lines) == 6
    assert np.allclose([[float(v) for v in line[1 : 1 + len(from_best.columns)]] for line in lines[1:]],
                       from_best.values, rtol=1e-5, atol=1e-6)  # fmt: skip

    # monitor=full drew what applies to the task, on the final weights too.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    curves = set(events.PluginTagToContent("pr_curves")) if task != "regression" else set()
    assert (task == "regression") == (not curves)
    assert {f"final/test/pr_curve/{c}" for c in from_best.columns} <= curves or task == "regression"


def test_a_table_row_that_is_not_a_number_is_named(table_run: Callable[[str], Path], tmp_path: Path) -> None:
    best = table_run("classification") / "checkpoints" / "best.pt"  # wine
    from lab.data.tabular import SklearnTable

    names = SklearnTable("wine").feature_names
    rows = tmp_path / "rows.csv"
    rows.write_text(",".join(names) + "\n" + ",".join(["1"] * 12 + ["nan"]) + "\n")
    with pytest.raises(UserError, match=f"line 2, column {names[-1]}: 'nan' is not a finite number"):
        predict(best, rows, device="cpu")
    rows.write_text(",".join(names[:-1]) + "\n" + ",".join(["1"] * 12) + "\n")
    with pytest.raises(UserError, match=f"column '{names[-1]}' is missing"):
        predict(best, rows, device="cpu")
