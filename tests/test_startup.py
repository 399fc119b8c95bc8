"""Start-up: a run imports only what it uses. Checked in real processes that load tests/import_probe/sitecustomize.py,
which reports every imported module and which files asked for a watched package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, cli_env, run_train

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


def test_a_table_run_imports_no_torchvision_wandb_onnx_or_optuna(tmp_path: Path) -> None:
    """`dataset=wine model=mlp` with the default logger, monitor, callbacks and checkpoints (so also what a default
    run imports besides its data and model): torchvision is for image data, image models and transforms only;
    wandb, onnx and optuna only when chosen."""
    report = tmp_path / "imports.json"
    run_train(tmp_path / "run", "dataset=wine", "model=mlp", "trainer.max_epochs=1",
              "trainer.limit_train_batches=3", env=probe_env(report))  # fmt: skip
    imports = json.loads(report.read_text())
    modules = set(imports["modules"])
    assert "lab.trainer" in modules and (tmp_path / "run" / "metrics.json").is_file()  # the probe saw the run
    assert not {m.partition(".")[0] for m in modules} & {"wandb", "onnx", "onnxruntime", "optuna"}
    # torchmetrics 1.9 imports torchvision (for its image metrics) whenever torchvision is installed; any other
    # file that asks for it, lab's own or a library's, fails this test, whether or not torchvision is loaded yet.
    own = f"{os.sep}torchvision{os.sep}", f"{os.sep}torchmetrics{os.sep}"
    assert [(file, module) for file, module in imports["requests"] if not any(p in file for p in own)] == []
    assert "torchvision" not in modules or "torchmetrics" in modules
