"""Export: plain state_dict (the tutorials' load line), safetensors, ONNX checked with onnxruntime, model.yaml.

All real: torch.save/load, safetensors, torch.onnx, onnxruntime on the CPU. Backbone weights come from a local file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
import torch
from conftest import ROOT, TINY, cli_env, compose_config

from lab.errors import UserError
from lab.export import ONNX_ATOL, ONNX_RTOL, export
from lab.train import run

QUIET = ["logger=none", "monitor=none", "print_config=false", "trainer.progress_bar=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    run(compose_config([*QUIET, *TINY], out))
    return out


def test_export_cli_writes_every_format(trained: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "export.py"), f"ckpt_path={trained / 'checkpoints' / 'best.pt'}"],
                          env=cli_env(), capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    out = trained / "export"
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert {p.name for p in out.iterdir()} == {"model.pt", "model.safetensors", "model.onnx", "model.yaml",
                                               "class_names.json", "config.yaml"}  # fmt: skip
    assert json.loads((out / "class_names.json").read_text())["class_names"] == [str(i) for i in range(10)]


def test_the_tutorials_load_line_works_on_model_pt(trained: Path, tmp_path: Path) -> None:
    export(trained / "checkpoints" / "best.pt", ["state_dict"], tmp_path)
    os.chdir(tmp_path)  # the README's lines, verbatim, run where the files are
    import hydra
    from omegaconf import OmegaConf

    cfg = OmegaConf.load("model.yaml")
    model = hydra.utils.instantiate(cfg)
    model.load_state_dict(torch.load("model.pt"))

    from lab import checkpoint as ckpt

    state = ckpt.load(trained / "checkpoints" / "best.pt")["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_onnx_matches_pytorch_with_onnxruntime_for_any_batch_size(trained: Path, tmp_path: Path) -> None:
    from lab.predict import load_model

    out = export(trained / "checkpoints" / "best.pt", ["onnx", "safetensors"], tmp_path, check=False)
    model, _, _ = load_model(trained / "checkpoints" / "best.pt", "cpu")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = torch.rand(batch, 1, 8, 8)
        (logits,) = session.run(["logits"], {"input": x.numpy()})
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(logits), model(x), atol=ONNX_ATOL, rtol=ONNX_RTOL)
    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    assert tensors.keys() == model.state_dict().keys()
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())


def test_exported_model_pt_predicts_and_starts_training(trained: Path, tmp_path: Path) -> None:
    from lab.predict import load_model

    out = export(trained / "checkpoints" / "best.pt", ["state_dict"], tmp_path / "export")
    _, config, class_names = load_model(out / "model.pt", "cpu")
    assert class_names == [str(i) for i in range(10)] and config["dataset"]["name"] == "digits"
    evaluated = tmp_path / "eval"
    run(compose_config([*QUIET, "train=false", f"ckpt_path={out / 'model.pt'}"], evaluated))
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (evaluated, trained))
    assert ours["val/acc"] == theirs["val/acc"]
    finetuned = tmp_path / "finetune"
    run(compose_config([*QUIET, f"ckpt_path={out / 'model.pt'}", *TINY], finetuned))
    assert json.loads((finetuned / "metrics.json").read_text())["epochs"] == 2  # from epoch 0, not resumed


def test_export_at_the_end_of_training(tmp_path: Path) -> None:
    run(compose_config([*QUIET, "export=[state_dict]", *TINY], tmp_path))
    assert (tmp_path / "export" / "model.pt").is_file() and (tmp_path / "export" / "model.yaml").is_file()
    assert not (tmp_path / "export" / "model.onnx").exists()


def test_unsupported_exports_fail_with_one_line(trained: Path, tmp_path: Path, monkeypatch) -> None:
    best = trained / "checkpoints" / "best.pt"
    with pytest.raises(UserError, match="unknown export format tflite"):
        export(best, ["tflite"], tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)  # as if the package were not installed
    with pytest.raises(UserError, match="the onnxscript package is not installed"):
        export(best, ["onnx"], tmp_path)
    monkeypatch.undo()

    from lab.export import save_onnx

    class DataDependent(
        torch.nn.Module
    ):  # Python control flow on tensor values: torch.export cannot trace it
        def forward(self, x):
            return x * 2 if x.sum().item() > 0 else x

    with pytest.raises(UserError, match="ONNX cannot export DataDependent") as error:
        save_onnx(DataDependent(), torch.rand(2, 3), tmp_path / "m.onnx")
    assert "\n" not in error.value.line()
