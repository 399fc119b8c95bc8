"""`predict.py`: train on a folder of generated PNGs (in-process), then predict those class names (real CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, in_process, train
from test_image_folder import make_images

from lab.errors import UserError
from lab.predict import predict


def test_train_on_image_folder_then_predict(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=12)
    train(tmp_path / "run", "dataset=image_folder", f"dataset.root={root}", "dataset.num_workers=0", "dataset.batch_size=8",
              "model=resnet18_frozen", "model.weights=null", "dataset.image_size=32", "trainer.max_epochs=3",
              "optimizer.lr=0.01")  # fmt: skip
    assert json.loads((tmp_path / "run/class_names.json").read_text())["class_names"] == ["cat", "dog", "fox"]
    ckpt = tmp_path / "run/checkpoints/best.pt"

    results = predict(ckpt, root, top_k=2)
    assert len(results) == 36 and all(len(top) == 2 for _, top in results)
    assert {name for _, top in results for name, _ in top} <= {"cat", "dog", "fox"}
    correct = sum(top[0][0] == Path(path).parent.name for path, top in results)
    assert correct > 36 // 3  # better than chance: the colour is learnable even by a random-init backbone

    proc = subprocess.run([sys.executable, str(ROOT / "predict.py"), f"ckpt_path={ckpt}",
                           f"inputs={root / 'dog' / '0.png'}", "top_k=3"],
                          capture_output=True, text=True, env=cli_env(), timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    path, top = proc.stdout.strip().split("\t")
    assert path.endswith("0.png") and sorted(top.split()[::2]) == ["cat", "dog", "fox"]


def test_predict_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="ckpt_path"):
        predict(tmp_path / "missing.pt", tmp_path)
    proc = in_process("predict.py", ["inputs=x.png"])
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: missing argument (ckpt_path): python predict.py ckpt_path=<best.pt> inputs=<image|folder|table.csv>"
    )
