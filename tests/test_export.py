"""Export: plain state_dict (the tutorials' load line), safetensors, ONNX checked with onnxruntime, model.yaml.

The exported model takes raw inputs and answers what predict.py answers. All real: torch.save/load, safetensors,
torch.onnx, onnxruntime on the CPU, PNG files written and read with PIL.
"""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def exported(trained: Path) -> subprocess.CompletedProcess:
    """`python export.py ckpt_path=<best.pt>`, once: every format in <run>/export, which the other tests read (an
    ONNX export costs 2 CPU s)."""
    return subprocess.run([sys.executable, str(ROOT / "export.py"), f"ckpt_path={trained / 'checkpoints' / 'best.pt'}"],
                          env=cli_env(), capture_output=True, text=True, timeout=300, check=True)  # fmt: skip


def test_export_cli_writes_every_format(trained: Path, exported: subprocess.CompletedProcess) -> None:
    out = trained / "export"
    assert exported.stdout.strip().splitlines()[-1] == str(out)
    assert {p.name for p in out.iterdir()} == {"model.pt", "model.safetensors", "model.onnx", "model.yaml",
                                               "class_names.json", "config.yaml", "README.md"}  # fmt: skip
    assert json.loads((out / "class_names.json").read_text())["class_names"] == [str(i) for i in range(10)]
    readme = (out / "README.md").read_text()  # the raw input it expects, and what it answers
    assert "`uint8` images, shape (N, 1, 8, 8)" in readme and "values 0..255" in readme
    assert "class probabilities (N, 10)" in readme


def test_the_tutorials_load_line_works_on_model_pt(trained: Path, exported, monkeypatch) -> None:
    monkeypatch.chdir(trained / "export")  # the README's lines, verbatim, run where the files are
    import hydra
    from omegaconf import OmegaConf

    cfg = OmegaConf.load("model.yaml")
    model = hydra.utils.instantiate(cfg)
    model.load_state_dict(torch.load("model.pt"))

    from lab import checkpoint as ckpt
    from lab.data import Preprocess

    state = ckpt.load(trained / "checkpoints" / "best.pt")["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # It takes raw uint8 images and answers class probabilities: training's preprocessing and a softmax inside.
    raw = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        expected = model.model.eval()(Preprocess(8, 1, [0.3053], [0.3761])(raw)).softmax(1)
        torch.testing.assert_close(model.eval()(raw), expected)


def test_onnx_matches_pytorch_with_onnxruntime_for_any_batch_size(trained: Path, exported) -> None:
    from lab.predict import load, load_model

    out = trained / "export"
    raw_model, _, _ = load(trained / "checkpoints" / "best.pt")
    model, _, _ = load_model(trained / "checkpoints" / "best.pt", "cpu")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"] and session.get_inputs()[
        0
    ].type == "tensor(uint8)"
    for batch in (1, 7):
        x = torch.randint(0, 256, (batch, 1, 8, 8), dtype=torch.uint8)
        (predictions,) = session.run(["predictions"], {"input": x.numpy()})
        with torch.no_grad():
            expected = raw_model(x)
        assert torch.allclose(torch.from_numpy(predictions), expected, atol=ONNX_ATOL, rtol=ONNX_RTOL)
        assert torch.allclose(expected.sum(1), torch.ones(batch))  # probabilities
    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    assert tensors.keys() == model.state_dict().keys()
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())


def test_image_files_give_the_same_numbers_from_best_pt_model_pt_and_onnx(
    trained: Path, exported, tmp_path: Path
) -> None:
    """predict.py on best.pt and on export/model.pt, and onnxruntime on model.onnx fed the files' raw pixels."""
    import numpy as np
    from PIL import Image

    from lab.data import Preprocess
    from lab.data.digits import Digits
    from lab.predict import load_model, predict

    images = tmp_path / "images"
    images.mkdir()
    for i, pixels in enumerate(Digits().data[:6]):  # digits' 0..1 values as 8-bit grayscale PNGs
        Image.fromarray((pixels.numpy() * 255).round().astype(np.uint8), mode="L").save(images / f"{i}.png")
    best, out = trained / "checkpoints" / "best.pt", trained / "export"
    from_best, from_export = (
        predict(best, images, device="cpu"),
        predict(out / "model.pt", images, device="cpu"),
    )
    raw = np.stack(
        [np.asarray(Image.open(images / f"{i}.png"))[None] for i in range(6)]
    )  # (6, 1, 8, 8) uint8
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (from_onnx,) = session.run(["predictions"], {"input": raw})
    assert (
        from_best.names == [str(images / f"{i}.png") for i in range(6)]
        and from_best.columns == from_export.columns
    )
    torch.testing.assert_close(torch.tensor(from_best.values), torch.tensor(from_export.values))
    torch.testing.assert_close(torch.tensor(from_onnx), torch.tensor(from_best.values), atol=1e-5, rtol=1e-4)
    # ... and they are what training computed: the model on the normalised pixels, softmax.
    model, _, _ = load_model(best, "cpu")
    with torch.no_grad():
        expected = model(Preprocess(8, 1, [0.3053], [0.3761])(torch.from_numpy(raw))).softmax(1)
    torch.testing.assert_close(torch.tensor(from_best.values), expected)
    assert from_best.labels == [str(i) for i in expected.argmax(1).tolist()]


def test_exported_model_pt_predicts_and_starts_training(trained: Path, exported, tmp_path: Path) -> None:
    from lab.predict import load_model

    out = trained / "export"
    _, config, class_names = load_model(out / "model.pt", "cpu")
    assert class_names == [str(i) for i in range(10)] and config["dataset"]["name"] == "digits"
    evaluated = tmp_path / "eval"
    run(compose_config([*QUIET, "train=false", f"ckpt_path={out / 'model.pt'}"], evaluated))
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (evaluated, trained))
    assert ours["val/acc"] == theirs["val/acc"]
    finetuned = tmp_path / "finetune"
    run(compose_config([*QUIET, f"ckpt_path={out / 'model.pt'}", *TINY, "trainer.limit_train_batches=1",
                        "trainer.limit_val_batches=1", "test=false"], finetuned))  # fmt: skip
    assert json.loads((finetuned / "metrics.json").read_text())["epochs"] == 2  # from epoch 0, not resumed


def test_export_at_the_end_of_training(tmp_path: Path) -> None:
    run(compose_config([*QUIET, "export=[state_dict]", "trainer.max_steps=1", "test=false"], tmp_path))
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

    class FixedBatch(torch.nn.Module):  # traces, but the graph only takes the example's batch size
        def forward(self, x):
            return x.reshape(len(x), -1) * 2

    with pytest.raises(UserError, match="onnxruntime cannot run the ONNX model on a batch of 5") as error:
        save_onnx(FixedBatch(), torch.rand(2, 3), tmp_path / "m.onnx")
    assert "\n" not in error.value.line()
