"""Training recipes from config (label smoothing, EMA weights, parameter groups, batch mixing, loop options), each
checked against a hand computation. Scenarios run in-process (Hydra's compose API + `lab.train.run`)."""

from __future__ import annotations

import json
import logging
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


def test_param_groups_no_weight_decay_and_layer_decay_compose_with_backbone_scale_and_warmup() -> None:
    from hydra.utils import instantiate

    from lab.optim import build_optimizer, build_schedulers, layers

    cfg = compose_config(["model=resnet18", "model.weights=null", "model.backbone_lr_scale=0.1", "optimizer=adamw",
                          "optimizer.lr=0.01", "optimizer.weight_decay=0.05", "optimizer.no_weight_decay=true",
                          "optimizer.layer_decay=0.5", "scheduler.warmup_steps=4"])  # fmt: skip
    model = instantiate(cfg.model)
    optimizer = build_optimizer(cfg.optimizer, model)
    build_schedulers(cfg.scheduler, optimizer, total_steps=10)  # warm-up: lr x 1/4 at step 1
    groups = {g["name"]: g for g in optimizer.param_groups}
    units = layers(model)  # conv1, bn1, layer1.0, layer1.1, ..., layer4.1, head
    assert len(units) == 11 and units[0] is model.features.conv1 and units[-1] is model.head
    # By hand: lr = 0.01 x backbone scale x 0.5^(layers below the head) x warm-up 1/4.
    assert groups["backbone.layer0"]["lr"] == pytest.approx(0.01 * 0.1 * 0.5**10 / 4)
    assert groups["backbone.layer0"]["params"] == [model.features.conv1.weight]
    assert groups["backbone.layer1.no_decay"]["lr"] == pytest.approx(0.01 * 0.1 * 0.5**9 / 4)
    assert groups["backbone.layer1.no_decay"]["weight_decay"] == 0.0  # BatchNorm weight and bias
    assert (
        groups["head.layer10"]["lr"] == pytest.approx(0.01 / 4)
        and groups["head.layer10"]["weight_decay"] == 0.05
    )
    assert groups["head.layer10.no_decay"]["params"] == [model.head[-1].bias]
    # Every 1-d parameter (BatchNorm weights, biases) is in a no_decay group, every other one decays.
    for g in optimizer.param_groups:
        assert all((p.ndim <= 1) == g["name"].endswith(".no_decay") for p in g["params"]), g["name"]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_no_weight_decay_leaves_the_groups_alone_without_weight_decay() -> None:
    from hydra.utils import instantiate

    from lab.optim import build_optimizer

    cfg = compose_config([])  # adam, weight_decay 0, no_weight_decay true: today's single group
    optimizer = build_optimizer(cfg.optimizer, instantiate(cfg.model))
    assert [g["name"] for g in optimizer.param_groups] == ["all"]


def mixed_batch(option: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of 6 random 3x8x8 images with labels 0..5 through `mix=<option>` (a fresh global RNG seed)."""
    from hydra.utils import instantiate

    mix = instantiate(compose_config([f"mix={option}", "dataset.num_classes=6"]).mix)
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6)
    torch.manual_seed(seed)
    mixed_x, soft = mix(x.clone(), y.clone())
    return x, y, mixed_x, soft


def test_mixup_mixes_images_and_targets_with_a_beta_lambda() -> None:
    x, y, mixed_x, soft = mixed_batch("mixup", seed=3)
    torch.manual_seed(3)  # by hand: λ ~ Beta(0.2, 0.2) from the same seed
    lam = float(torch.distributions.Beta(torch.tensor([0.2]), torch.tensor([0.2])).sample(()))
    assert torch.allclose(mixed_x, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)
    one_hot = torch.nn.functional.one_hot(y, 6).float()
    assert torch.allclose(soft, lam * one_hot + (1 - lam) * one_hot.roll(1, 0), atol=1e-6)


def test_cutmix_pastes_a_box_and_weights_the_targets_by_its_area() -> None:
    for seed in range(5):
        x, y, mixed_x, soft = mixed_batch("cutmix", seed)
        own = (mixed_x == x).all(dim=(0, 1))  # pixels kept from each image (same box for the whole batch)
        pasted = (mixed_x == x.roll(1, 0)).all(dim=(0, 1))
        assert bool((own | pasted).all())
        kept = float(own.float().mean())  # by hand: the share of each image's own pixels
        assert torch.allclose(soft[torch.arange(6), y], torch.full((6,), kept))
        assert torch.allclose(soft[torch.arange(6), y.roll(1, 0)], torch.full((6,), 1 - kept))


def test_mix_trains_on_both_loader_paths_and_is_refused_for_regression(tmp_path: Path, capsys) -> None:
    for loader in ("true", "false"):
        metrics = train_in_process(tmp_path / loader, "mix=mixup_cutmix", f"dataset.in_memory={loader}",
                                   "dataset.num_workers=0", "logger=csv", "trainer.log_every_n_steps=4")  # fmt: skip
        assert metrics["status"] == "success" and 0 <= metrics["val/acc"] <= 1
        rows = (tmp_path / loader / "metrics.csv").read_text()
        assert "train/acc" in rows  # against the argmax of the mixed targets
    from lab.train import main

    cfg = compose_config(
        [*QUICK, "task=regression", "dataset=diabetes", "model=mlp", "mix=mixup"], tmp_path / "r"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(cfg)
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(
        "error: MixUp/CutMix mix class labels into soft targets; Regression has none (mix):"
    )


def val_steps(run_dir: Path) -> list[int]:
    import csv

    rows = csv.DictReader((run_dir / "metrics.csv").open())
    return [int(r["step"]) for r in rows if r.get("val/acc")]  # the final evaluation shares the last step


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = ckpt.load(a)["model"], ckpt.load(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


LOOP = ["logger=csv", "model=mlp", "trainer.log_every_n_steps=4"]


def test_val_check_interval_and_check_val_every_n_epoch_validate_when_told(tmp_path: Path, caplog) -> None:
    # 8 steps an epoch: a fraction 0.5 validates every 4 steps, within the epoch and at its end.
    with caplog.at_level(logging.INFO, logger="lab"):
        metrics = train_in_process(
            tmp_path / "half", *LOOP, "trainer.max_epochs=2", "trainer.val_check_interval=0.5"
        )
    assert val_steps(tmp_path / "half") == [4, 8, 12, 16]
    log = caplog.text
    assert "step 4 (epoch 1, batch 4)  train/loss=" in log and "step 12 (epoch 2, batch 4)" in log
    assert metrics["global_step"] == 16 and metrics["epochs"] == 2
    # An int counts optimizer steps from each epoch's start (as Lightning counts batches), epoch ends too.
    train_in_process(tmp_path / "three", *LOOP, "trainer.max_epochs=2", "trainer.val_check_interval=3")
    assert val_steps(tmp_path / "three") == [3, 6, 8, 11, 14, 16]
    # Every second epoch, and the last: epochs 2 and 3; last.pt is written every epoch all the same.
    train_in_process(tmp_path / "every2", *LOOP, "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2")
    assert val_steps(tmp_path / "every2") == [16, 24]


def test_max_steps_stops_mid_epoch_validated_and_resumes_exactly(tmp_path: Path) -> None:
    metrics = train_in_process(tmp_path / "five", *LOOP, "trainer.max_epochs=3", "trainer.max_steps=5")
    assert metrics["global_step"] == 5 and metrics["stop_reason"] == "max_steps" and metrics["epochs"] == 0
    assert val_steps(tmp_path / "five") == [5]
    last = tmp_path / "five" / "checkpoints" / "last.pt"
    assert ckpt.load(last)["batch_in_epoch"] == 5
    train_in_process(
        tmp_path / "resumed", *LOOP, "trainer.max_epochs=3", "trainer.max_steps=12", f"ckpt_path={last}"
    )
    train_in_process(tmp_path / "straight", *LOOP, "trainer.max_epochs=3", "trainer.max_steps=12")
    assert same_weights(
        tmp_path / "resumed" / "checkpoints" / "last.pt", tmp_path / "straight" / "checkpoints" / "last.pt"
    )
    assert ckpt.load(tmp_path / "straight" / "checkpoints" / "last.pt")["global_step"] == 12


def test_max_time_stops_with_last_pt_written_and_resumes_exactly(tmp_path: Path) -> None:
    metrics = train_in_process(tmp_path / "timed", *LOOP, "trainer.max_epochs=1000", "trainer.max_time=0.5")
    assert metrics["stop_reason"] == "max_time" and 0 < metrics["global_step"] < 8000
    last = ckpt.load(tmp_path / "timed" / "checkpoints" / "last.pt")
    assert last["global_step"] == metrics["global_step"]  # written where the time ran out
    epochs = last["epoch"] + 1
    train_in_process(tmp_path / "resumed", *LOOP, f"trainer.max_epochs={epochs}",
                     f"ckpt_path={tmp_path / 'timed' / 'checkpoints' / 'last.pt'}")  # fmt: skip
    train_in_process(tmp_path / "straight", *LOOP, f"trainer.max_epochs={epochs}")
    assert same_weights(
        tmp_path / "resumed" / "checkpoints" / "last.pt", tmp_path / "straight" / "checkpoints" / "last.pt"
    )


@pytest.mark.parametrize(
    "override",
    ["trainer.val_check_interval=1.5", "trainer.val_check_interval=0", "trainer.max_steps=0",
     "trainer.max_time=soon", "trainer.check_val_every_n_epoch=0", "optimizer.layer_decay=2"],
)  # fmt: skip
def test_bad_recipe_values_fail_before_training_with_one_line(override: str, tmp_path: Path, capsys) -> None:
    from lab.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(compose_config([*QUICK, override], tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f"({override.split('=')[0]})" in err and "\n" not in err
    assert not (tmp_path / "checkpoints").exists()


def test_the_recipe_preset_through_the_command_line(tmp_path: Path) -> None:
    import csv

    from conftest import train

    run_dir = tmp_path / "run"
    train(run_dir, "experiment=recipe", "trainer.max_epochs=2", "trainer.limit_train_batches=6",
              "trainer.log_every_n_steps=3", "scheduler.warmup_steps=3", "logger=csv", "trainer.device=cpu")  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "success" and metrics["monitor"] == "val_ema/acc"
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [r["val_ema/acc"] for r in rows if r.get("val_ema/acc")] and any(
        r.get("lr/all.no_decay") for r in rows
    )
    best = ckpt.load(run_dir / "checkpoints" / "best.pt")
    assert (
        best["callbacks"]["ema"]["inference_weights"]
        and best["config"]["task"]["loss"]["label_smoothing"] == 0.1
    )
