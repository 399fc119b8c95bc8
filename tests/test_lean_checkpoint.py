"""Lean checkpoints for frozen backbones: the head and the frozen part's identity, rebuilt and checked on load.

The backbone weights come from a local file (`model.weights_path`): no download is possible here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FEW_IMAGES, TINY, compose_config, train

from lab import Callback
from lab import checkpoint as ckpt
from lab.errors import UserError
from lab.models.backbone import Backbone
from lab.train import run

SMALL = [
    "model=resnet18_frozen",
    *FEW_IMAGES,  # the features of every split are extracted, and a run after the unfreeze trains the whole network
    "dataset.image_size=16",
    "logger=none",
    "monitor=none",
    "print_config=false",
    "trainer.progress_bar=false",
    *TINY,
]


def save_weights(path: Path, seed: int) -> Path:
    import torchvision

    torch.manual_seed(seed)
    torch.save(torchvision.models.get_model("resnet18", weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_weights(tmp_path_factory.mktemp("weights") / "resnet18.pth", seed=1)


@pytest.fixture(scope="module")
def small(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """SMALL on the saved weights, with one feature cache for this module's runs: the digits' features are
    extracted once (every run here freezes the same backbone), and nothing is kept outside the test's folders."""
    cache = tmp_path_factory.mktemp("features")
    return [*SMALL, f"model.weights_path={weights}", f"paths.feature_cache={cache}"]


@pytest.fixture(scope="module")
def lean_run(small: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lean")
    run(compose_config(small, out))
    return out


def test_lean_checkpoint_holds_the_head_and_the_backbone_identity(lean_run: Path, weights: Path) -> None:
    state = ckpt.load(lean_run / "checkpoints" / "best.pt")
    assert sorted(state["model"]) == ["head.1.bias", "head.1.weight"]
    frozen = state["frozen"]
    assert frozen["name"] == "resnet18" and frozen["weights_path"] == str(weights)
    model = Backbone("resnet18", num_classes=10, weights_path=str(weights), freeze=True)
    assert frozen["fingerprint"] == model.frozen_identity()["fingerprint"]
    size = (lean_run / "checkpoints" / "best.pt").stat().st_size
    assert size < 200_000, size  # resnet18 in full is ~45 MB


def test_lean_checkpoint_evaluates_resumes_and_predicts(
    lean_run: Path, weights: Path, small: list[str], tmp_path: Path
) -> None:
    best = lean_run / "checkpoints" / "best.pt"
    evaluated = tmp_path / "eval"
    run(compose_config([*small, "train=false", f"ckpt_path={best}"], evaluated))
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (evaluated, lean_run))
    assert ours["val/acc"] == theirs["val/acc"] and ours["test/acc"] == theirs["test/acc"]

    resumed = tmp_path / "resumed"
    last = lean_run / "checkpoints" / "last.pt"
    overrides = [*small, f"ckpt_path={last}", "trainer.max_epochs=3"]
    run(compose_config(overrides, resumed))
    assert json.loads((resumed / "metrics.json").read_text())["epochs"] == 3

    from lab.predict import load_model

    model, _, class_names = load_model(best, "cpu")
    x = torch.rand(2, 3, 32, 32)
    full = Backbone("resnet18", num_classes=10, weights_path=str(weights), freeze=True).eval()
    full.head.load_state_dict({k.removeprefix("head."): v for k, v in ckpt.load(best)["model"].items()})
    with torch.no_grad():
        assert torch.equal(model(x), full(x))
    assert class_names == [str(i) for i in range(10)]

    from lab.export import export

    out = export(best, ["state_dict"], tmp_path / "export")  # always complete: stands alone
    exported = torch.load(out / "model.pt", weights_only=True)
    assert exported.keys() == full.state_dict().keys()
    assert torch.equal(exported["features.conv1.weight"], full.state_dict()["features.conv1.weight"])


def test_other_backbone_weights_are_refused_with_one_line(lean_run: Path, tmp_path: Path) -> None:
    other = save_weights(tmp_path / "other.pth", seed=2)
    best = lean_run / "checkpoints" / "best.pt"
    model = Backbone("resnet18", num_classes=10, weights_path=str(other), freeze=True)
    with pytest.raises(UserError) as error:
        ckpt.restore_model(model, ckpt.load(best), f"ckpt_path={best}")
    line = error.value.line()
    saved, mine = ckpt.load(best)["frozen"]["fingerprint"], model.frozen_identity()["fingerprint"]
    assert saved != mine and saved in line and mine in line and str(other) in line and "\n" not in line
    proc = train(
        tmp_path / "cli",
        *SMALL,
        f"model.weights_path={other}",
        "train=false",
        f"ckpt_path={best}",
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: the checkpoint's")
    assert "Traceback" not in proc.stderr


def test_save_frozen_keeps_every_weight(small: list[str], tmp_path: Path) -> None:
    run(compose_config([*small, "checkpoint.save_frozen=true"], tmp_path))
    state = ckpt.load(tmp_path / "checkpoints" / "best.pt")
    assert state["frozen"] is None and "features.conv1.weight" in state["model"]


def test_random_weights_have_no_name_to_rebuild_from_so_they_are_stored() -> None:
    model = Backbone("resnet18", num_classes=3, weights=None, freeze=True)
    entries = ckpt.model_state(model)
    assert entries["frozen"] is None and "features.conv1.weight" in entries["model"]


class FirstIsBest(Callback):
    """Makes the first validation the best (a val/acc that falls each epoch), whatever the weights do."""

    def on_validation(self, trainer: Any, metrics: dict[str, float]) -> None:
        metrics["val/acc"] = 1.0 - 0.1 * trainer.state.epoch


def test_a_checkpoint_from_before_the_unfreeze_is_the_final_evaluation(
    weights: Path, small: list[str], tmp_path: Path
) -> None:
    # Epochs 1-2 train the head on the frozen backbone (lean checkpoints), epoch 3 the whole network.
    out = tmp_path / "unfreeze"
    limits = ["trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]  # the same batches in both runs
    run(compose_config([*small, *limits, "model.unfreeze_at_epoch=2", "trainer.max_epochs=3",
                        "+callbacks.first_is_best={_target_: test_lean_checkpoint.FirstIsBest}"], out))  # fmt: skip
    best, last = (ckpt.load(out / "checkpoints" / name) for name in ("best.pt", "last.pt"))
    assert best["epoch"] == 1 and best["frozen"] is not None and "features.conv1.weight" not in best["model"]
    assert last["epoch"] == 3 and last["frozen"] is None  # nothing frozen any more: every weight stored
    assert not torch.equal(last["model"]["features.conv1.weight"], torch.load(weights)["conv1.weight"])
    reported = json.loads((out / "metrics.json").read_text())
    assert reported["status"] == "success"
    # The final evaluation used best.pt's weights: the same numbers as evaluating it on a frozen model.
    evaluated = tmp_path / "eval"
    overrides = [
        *small,
        *limits,
        "train=false",
        f"ckpt_path={out / 'checkpoints' / 'best.pt'}",
    ]
    run(compose_config(overrides, evaluated))
    again = json.loads((evaluated / "metrics.json").read_text())
    assert reported["val/loss"] == pytest.approx(again["val/loss"], rel=1e-6)
    assert reported["test/acc"] == pytest.approx(again["test/acc"], rel=1e-6)


def test_ema_keeps_lean_checkpoints_lean(
    lean_run: Path, weights: Path, small: list[str], tmp_path: Path
) -> None:
    run(compose_config([*small, "callbacks=[default,ema]"], tmp_path))
    best = tmp_path / "checkpoints" / "best.pt"
    state = ckpt.load(best)
    assert (
        sorted(state["callbacks"]["ema"]["weights"])
        == sorted(state["model"])
        == ["head.1.bias", "head.1.weight"]
    )
    assert best.stat().st_size <= 2 * (lean_run / "checkpoints" / "best.pt").stat().st_size
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "success"
    # The averages are the weights evaluation, predict and export use: complete with the frozen part.
    from lab.predict import load_model

    model, _, _ = load_model(best, "cpu")
    assert torch.equal(model.head[1].weight, state["callbacks"]["ema"]["weights"]["head.1.weight"])
    assert torch.equal(model.features.conv1.weight, torch.load(weights)["conv1.weight"])
    # Resumed, the averages of the head continue; the frozen part's are the model's own, rebuilt.
    last = tmp_path / "checkpoints" / "last.pt"
    overrides = [*small, "callbacks=[default,ema]", f"ckpt_path={last}"]
    run(compose_config([*overrides, "trainer.max_epochs=3"], tmp_path / "resumed"))
    resumed = ckpt.load(tmp_path / "resumed" / "checkpoints" / "last.pt")["callbacks"]["ema"]
    assert resumed["updates"] == 12 and sorted(resumed["weights"]) == ["head.1.bias", "head.1.weight"]


def test_predict_on_a_lean_checkpoint_without_its_weights_file_is_one_clear_error(
    lean_run: Path, weights: Path
) -> None:
    from lab.predict import load_model

    moved = weights.with_suffix(".moved")
    weights.rename(moved)
    try:
        with pytest.raises(UserError) as error:
            load_model(lean_run / "checkpoints" / "best.pt", "cpu")
    finally:
        moved.rename(weights)
    line = error.value.line()
    assert (
        line.startswith(f"error: weights file not found (model.weights_path={weights}): ")
        and "\n" not in line
    )
    assert "lean checkpoint" in line and "export" in line
