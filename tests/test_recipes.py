"""Training recipes from config (label smoothing, EMA weights, parameter groups, batch mixing, loop options), each
checked against a hand computation. Scenarios run in-process (Hydra's compose API + `lab.train.run`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from lab import checkpoint as ckpt
from lab.train import run

QUICK = ["trainer.max_epochs=1", "trainer.progress_bar=false", "print_config=false", "logger=none",
         "trainer.device=cpu", "trainer.deterministic=true", "trainer.limit_train_batches=8", "test=false"]  # fmt: skip


def train_in_process(run_dir: Path, *overrides: str) -> dict:
    """`python train.py <overrides>` in this process; returns metrics.json."""
    run(compose_config([*QUICK, *overrides], run_dir))
    return json.loads((run_dir / "metrics.json").read_text())


def val_split(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from lab.data import build_data

    cfg = compose_config(QUICK, run_dir / "check")
    return build_data(cfg.dataset).val.tensors


def model_from(path: Path, key: str = "model") -> torch.nn.Module:
    from lab.models import build_model

    state = ckpt.load(path)
    model = build_model(state["config"]["model"])
    model.load_state_dict(ckpt.inference_weights(state) if key == "inference" else state[key])
    return model.eval()


def smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, eps: float) -> float:
    """By hand: (1 - eps) x the log-likelihood of the true class + eps x the mean over all classes."""
    log_p = logits.double().log_softmax(1)
    true = log_p.gather(1, targets[:, None]).squeeze(1)
    return float((-(1 - eps) * true - eps * log_p.mean(1)).mean())


def test_label_smoothing_is_the_classification_loss_option(tmp_path: Path) -> None:
    metrics = train_in_process(tmp_path / "run", "task.loss.label_smoothing=0.2")
    model = model_from(tmp_path / "run" / "checkpoints" / "best.pt")
    x, y = val_split(tmp_path)
    with torch.no_grad():
        logits = model(x)
    assert metrics["val/loss"] == pytest.approx(smoothed_cross_entropy(logits, y, 0.2), rel=1e-5)
    # ... which is not the plain cross-entropy: the option reached the loss.
    assert metrics["val/loss"] != pytest.approx(smoothed_cross_entropy(logits, y, 0.0), rel=1e-3)


def test_ema_callback_averages_a_known_weight_sequence_as_by_hand() -> None:
    from types import SimpleNamespace

    from lab.callbacks.ema import EMA

    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    trainer = SimpleNamespace(model=model)
    ema = EMA(decay=0.9, warmup=True)
    ema.on_fit_start(trainer)
    weights = [torch.full((1, 2), float(v)) for v in (4.0, 2.0, 8.0, 1.0)]
    running = [torch.full((1,), float(v)) for v in (0.5, 1.5, 2.5, 3.5)]  # a buffer: averaged too
    for w, r in zip(weights, running, strict=True):
        with torch.no_grad():
            model[0].weight.copy_(w)
            model[1].running_mean.copy_(r)
        ema.on_optimizer_step(trainer)
    # By hand: the first update copies; update n (n = 1, 2, ...) uses min(0.9, (1 + n) / (10 + n)).
    expected_w, expected_r = 4.0, 0.5
    for n, (w, r) in enumerate(zip((2.0, 8.0, 1.0), (1.5, 2.5, 3.5), strict=True), start=1):
        d = min(0.9, (1 + n) / (10 + n))
        expected_w, expected_r = d * expected_w + (1 - d) * w, d * expected_r + (1 - d) * r
    averaged = ema.state_dict()["weights"]
    assert torch.allclose(averaged["0.weight"], torch.full((1, 2), expected_w))
    assert torch.allclose(averaged["1.running_mean"], torch.full((1,), expected_r))
    assert ema.state_dict()["updates"] == 4
    # Swapping in and out restores the raw weights bit for bit.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema.swap(model)
    assert torch.allclose(model[0].weight, torch.full((1, 2), expected_w))
    ema.swap(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ema_is_validated_beside_the_raw_weights_and_chosen_for_evaluation(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    metrics = train_in_process(run_dir, "callbacks=[default,ema]", "callbacks.ema.decay=0.9",
                               "checkpoint.monitor=val_ema/acc", "trainer.max_epochs=2")  # fmt: skip
    best = ckpt.load(run_dir / "checkpoints" / "best.pt")
    state = best["callbacks"]["ema"]
    assert state["inference_weights"] and state["updates"] == best["global_step"] > 0
    raw, averaged = (
        model_from(run_dir / "checkpoints" / "best.pt"),
        model_from(run_dir / "checkpoints" / "best.pt", "inference"),
    )
    x, y = val_split(tmp_path)
    with torch.no_grad():
        acc_raw = (raw(x).argmax(1) == y).float().mean().item()
        acc_ema = (averaged(x).argmax(1) == y).float().mean().item()
    assert acc_raw != acc_ema  # two different sets of weights
    # The final evaluation ran the averages of best.pt; best was picked by val_ema/acc.
    assert metrics["val/acc"] == pytest.approx(acc_ema) and metrics["best"] == pytest.approx(acc_ema)
    assert metrics["monitor"] == "val_ema/acc"
