"""Start-up: a run imports only what it uses and does each piece of start-up work once. Imports are checked in real
processes that load tests/import_probe/sitecustomize.py, which reports every imported module and which files asked
for a watched package; the work done once is counted in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_env, isolated_process, run_train, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lab
from lab.loggers.tensorboard import TensorBoardLogger
from lab.models.simple import SimpleCNN

PROBE = Path(__file__).resolve().parent / "import_probe"


def probe_env(report: Path, **extra: str) -> dict[str, str]:
    return cli_env(
        PYTHONPATH=os.pathsep.join([str(PROBE), str(ROOT / "src")]), LAB_IMPORT_REPORT=str(report), **extra
    )


def test_the_probe_sees_import_statements_and_import_module(tmp_path: Path) -> None:
    report = tmp_path / "imports.json"
    code = "import json\nimport importlib\nimportlib.import_module('csv')\nimport json.decoder"
    env = probe_env(report, LAB_IMPORT_WATCH="json,csv")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    requests = json.loads(report.read_text())["requests"]
    assert [module for file, module in requests if file == "<string>"] == ["json", "csv", "json.decoder"]


def test_a_table_run_imports_no_torchvision_torchmetrics_wandb_onnx_or_optuna(tmp_path: Path) -> None:
    """`dataset=wine model=mlp` with the default logger, monitor, callbacks and checkpoints (so also what a default
    run imports besides its data and model): torchvision is for image data, image models and transforms only;
    torchmetrics for a metric the config names (the defaults are lab's own); wandb, onnx and optuna only when
    chosen. Any file that asks for torchvision or torchmetrics, lab's own or a library's, fails this test. (A digits
    run imports no torchmetrics either: tests/test_loggers.py checks its `logger=none` run.)"""
    report = tmp_path / "imports.json"
    env = probe_env(report, LAB_IMPORT_WATCH="torchvision,torchmetrics")
    run_train(tmp_path / "run", "dataset=wine", "model=mlp", "trainer.max_epochs=1",
              "trainer.limit_train_batches=3", env=env)  # fmt: skip
    imports = json.loads(report.read_text())
    modules = {m.partition(".")[0] for m in imports["modules"]}
    assert (
        "lab.trainer" in imports["modules"] and (tmp_path / "run" / "metrics.json").is_file()
    )  # the probe saw it
    assert not modules & {"torchvision", "torchmetrics", "wandb", "onnx", "onnxruntime", "optuna"}
    assert imports["requests"] == []


@pytest.mark.parametrize("launcher", ["train.py", "lab.fit"])
def test_a_run_composes_its_config_once(
    launcher: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hydra's run composes the config; neither an early check of the command line nor Hydra's question "run or
    sweep?" composes it again (a composition costs a few tenths of a CPU second)."""
    from hydra._internal.hydra import Hydra

    composed: list[object] = []
    compose_config = Hydra.compose_config

    def counted(self: Hydra, *args: object, **kwargs: object) -> object:
        composed.append(kwargs.get("overrides"))
        return compose_config(self, *args, **kwargs)

    monkeypatch.setattr(Hydra, "compose_config", counted)
    run_dir, overrides = tmp_path / "run", ["dataset=wine", "model=mlp", "trainer.max_steps=1", "test=false"]
    if launcher == "train.py":
        train(run_dir, *overrides)
    else:
        with isolated_process(cli_env(), ROOT):
            lab.fit([*overrides, "print_config=false", f"hydra.run.dir={run_dir}"])
    assert len(composed) == 1 and (run_dir / "metrics.json").is_file()


def test_a_config_mistake_is_still_one_line_before_anything_is_written(tmp_path: Path) -> None:
    proc = train(tmp_path / "run", "model=mlp", "model.hiden=32", check=False)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert proc.stderr.strip().splitlines() == [
        "error: unknown key 'hiden' (model.hiden): model has _target_, depth, dropout, hidden, input_shape, "
        "num_outputs"
    ]


def test_the_model_graph_runs_the_model_once(tmp_path: Path) -> None:
    """TensorBoard's add_graph traces with torch.jit's check, which traces and runs the model twice more."""
    model = SimpleCNN(in_channels=1, num_classes=10).eval()
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    logger = TensorBoardLogger(str(tmp_path))
    logger.log_graph(model, torch.zeros(1, 1, 8, 8))
    logger.close()
    graph = EventAccumulator(str(tmp_path)).Reload().Graph()
    assert calls == [1] and any("Conv2d" in node.name for node in graph.node)


def test_test_false_draws_no_figures_of_the_test_split(tmp_path: Path) -> None:
    """The end-of-training PR curves (on by default) cover the splits the run evaluates: with `test=false` no pass
    over the test split is made for them."""
    train(tmp_path / "run", "trainer.max_steps=1", "test=false")
    tags = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload().Tags()["tensors"]
    assert any(tag.startswith("final/val/pr_curve/") for tag in tags)
    assert not any(tag.startswith("final/test/") for tag in tags)
