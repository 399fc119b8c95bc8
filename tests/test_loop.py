"""The loop built in Python (no Hydra), and that every loop setting does what it says: schedulers span the optimizer
steps that really run, a short last accumulation window is averaged, `val_check_interval` counts optimizer steps,
`last.pt` holds the final state. Everything runs through `Trainer.fit` on tiny models, recorded by hooks."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import CONF, compose_config
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lab import Callback
from lab import checkpoint as ckpt
from lab.config import TrainerConfig
from lab.trainer import Trainer, optimizer_steps

FEATURES, CLASSES = 8, 4


def classification():
    from lab.tasks.classification import Classification
    from lab.tasks.metrics import MulticlassAccuracy

    acc = MulticlassAccuracy(num_classes=CLASSES)
    return Classification(nn.CrossEntropyLoss(), {"acc": acc}, input_shape=[FEATURES], num_classes=CLASSES)


def batches(count: int, size: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` batches of a learnable problem: the class is the argmax of a fixed projection of the inputs."""
    g = torch.Generator().manual_seed(seed)
    projection = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(99))
    x = torch.randn(count * size, FEATURES, generator=g)
    y = (x @ projection).argmax(1)
    return list(zip(x.split(size), y.split(size), strict=True))


class Recorder(Callback):
    """A callback: the global step of every validation, and the learning rates each optimizer step used."""

    def __init__(self) -> None:
        self.validations: list[int] = []
        self.lrs: list[list[float]] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        trainer.optimizer.register_step_pre_hook(
            lambda optimizer, args, kwargs: self.lrs.append([g["lr"] for g in optimizer.param_groups])
        )

    def on_validation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.validations.append(trainer.state.global_step)


def test_trainer_built_in_python_without_hydra_learns() -> None:
    torch.manual_seed(0)
    data = batches(16, size=8)
    x, y = (torch.cat(t) for t in zip(*data, strict=True))
    train = DataLoader(TensorDataset(x[:96], y[:96]), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(x[96:], y[96:]), batch_size=16)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = Trainer(model, classification(), {"train": train, "val": val}, optimizer,
                      config=TrainerConfig(max_epochs=3, progress_bar=False))  # fmt: skip
    before = trainer.evaluate("val")
    metrics = trainer.fit()
    assert trainer.state.epoch == 3 and trainer.state.global_step == 3 * 12
    assert metrics["val/loss"] < 0.8 * before["val/loss"]
    assert metrics["val/acc"] > before["val/acc"]


def fit(model: nn.Module, data: list, config: TrainerConfig, *, scheduler: str | None = None, lr: float = 0.1,
        tmp_path: Path | None = None, checkpoint: dict | None = None, callbacks: dict | None = None,
        ckpt_path: Path | None = None):  # fmt: skip
    """Fit `model` on the fixed batches `data` (val: the first two) with the shipped `scheduler` option."""
    from lab.optim import build_optimizer, build_schedulers

    cfg = compose_config([f"scheduler={scheduler or 'none'}", "optimizer=sgd", f"optimizer.lr={lr}",
                          "optimizer.momentum=0", "optimizer.nesterov=false", f"trainer.max_epochs={config.max_epochs}"])  # fmt: skip
    optimizer = build_optimizer(cfg.optimizer, model)
    schedulers = build_schedulers(cfg.scheduler, optimizer, optimizer_steps(config, len(data)))
    checkpointer = None
    if tmp_path is not None:
        checkpointer = ckpt.Checkpointer(
            str(tmp_path), "val/acc", "max", **(checkpoint or {}), async_write=False
        )
    recorder = Recorder()
    trainer = Trainer(model, classification(), {"train": data, "val": data[:2]}, optimizer, config,
                      schedulers=schedulers, checkpointer=checkpointer,
                      callbacks={"recorder": recorder, **(callbacks or {})})  # fmt: skip
    trainer.fit(ckpt_path)
    return trainer, recorder, cfg


class TwoGroups(nn.Module):
    """A model with its own parameter groups, the second at a tenth of the lr (like a backbone's lr scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(FEATURES, 16), nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.body.parameters()), "name": "body", "lr_scale": 0.1},
                {"params": list(self.head.parameters()), "name": "head"}]  # fmt: skip


SCHEDULERS = sorted(p.stem for p in (CONF / "scheduler").glob("*.yaml"))
# (accumulate_grad_batches, limit_train_batches, max_steps) over 10 batches a epoch, 6 epochs
LOOPS = [(1, None, None), (3, None, None), (2, 7, None), (1, 5, 20)]


@pytest.mark.parametrize("loop", LOOPS, ids=lambda loop: "acc{}-limit{}-max{}".format(*loop))
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_spans_the_optimizer_steps_that_run(scheduler: str, loop: tuple) -> None:
    accumulate, limit, max_steps = loop
    config = TrainerConfig(max_epochs=6, accumulate_grad_batches=accumulate, limit_train_batches=limit,
                           max_steps=max_steps, progress_bar=False, log_every_n_steps=100)  # fmt: skip
    torch.manual_seed(0)
    trainer, recorder, cfg = fit(TwoGroups(), batches(10), config, scheduler=scheduler, lr=0.1)
    per_epoch = math.ceil((limit or 10) / accumulate)
    steps = min(6 * per_epoch, max_steps or 6 * per_epoch)
    assert len(recorder.lrs) == steps == trainer.state.global_step
    body, head = zip(*recorder.lrs, strict=True)
    # Every group keeps its own lr scale through the whole schedule (OneCycle's max_lr included).
    assert body == pytest.approx([0.1 * lr for lr in head])
    first, peak, last = head[0], max(head), head[-1]
    epoch_of = [step // per_epoch for step in range(steps)]  # the epoch each step belongs to
    if scheduler == "none":
        assert set(head) == {0.1}
    elif scheduler == "onecycle":
        s = cfg.scheduler
        assert first == pytest.approx(0.1 / 25)  # max_lr / div_factor
        # The peak is where the warm-up phase ends (step pct_start x steps - 1, between two steps when fractional).
        assert peak == pytest.approx(0.1, rel=0.01) and abs(head.index(peak) - (s.pct_start * steps - 1)) < 1
        assert last == pytest.approx(0.1 / 25 / 1e4)  # annealed to the end at the last step that runs
    elif scheduler == "cosine":  # per epoch, over max_epochs
        expected = [0.5 * 0.1 * (1 + math.cos(math.pi * e / 6)) for e in epoch_of]
        assert list(head) == pytest.approx(expected)
        assert first == peak == 0.1
    elif scheduler == "step":  # x0.1 after 5 epochs
        assert list(head) == pytest.approx([0.1 * 0.1 ** (e // 5) for e in epoch_of])
    elif scheduler == "plateau":  # per epoch, only ever down by `factor`, never above the lr
        assert first == peak == 0.1
        for e in range(max(epoch_of) + 1):  # constant within an epoch
            assert len({lr for lr, epoch in zip(head, epoch_of, strict=True) if epoch == e}) == 1
        assert all(any(lr == pytest.approx(0.1 * 0.1**k) for k in range(6)) for lr in head)
    else:
        pytest.fail(f"no expectations for the shipped scheduler {scheduler!r}: add them here")


class GradientProbe(Callback):
    """A callback: the gradient of each optimizer step (`on_after_backward`), and the model as it was before."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []
        self.models: list[nn.Module] = []
        self.before: nn.Module | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.before = copy.deepcopy(trainer.model)

    def on_after_backward(self, trainer: Trainer) -> None:
        self.grads.append([p.grad.clone() for p in trainer.model.parameters()])
        self.models.append(self.before)

    def on_optimizer_step(self, trainer: Trainer) -> None:
        self.before = copy.deepcopy(trainer.model)


def test_a_short_last_accumulation_window_is_averaged_over_its_batches() -> None:
    # 5 batches of 4 with accumulate 3: windows [0, 1, 2] and [3, 4]; each step's gradient must be the gradient of
    # one batch of all the window's samples.
    data = batches(5)
    torch.manual_seed(0)
    probe = GradientProbe()
    config = TrainerConfig(max_epochs=1, accumulate_grad_batches=3, progress_bar=False)
    fit(nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES)), data, config,
        callbacks={"probe": probe})  # fmt: skip
    assert len(probe.grads) == 2
    for grads, model, window in zip(probe.grads, probe.models, ([0, 1, 2], [3, 4]), strict=True):
        x = torch.cat([data[i][0] for i in window])
        y = torch.cat([data[i][1] for i in window])
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for got, expected in zip(grads, [p.grad for p in model.parameters()], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("accumulate", "interval", "expected"),
    [
        (1, 0.25, [3, 5, 8, 10]),  # 10 steps an epoch: after 2.5, 5, 7.5 (rounded up) and the end
        (2, 0.25, [2, 3, 4, 5]),  # 5 steps: after 1.25, 2.5, 3.75 (rounded up) and the end
        (2, 2, [2, 4, 5]),  # every 2 optimizer steps and the end
        (1, 0.5, [5, 10]),
        (3, None, [4]),  # 10 batches: 3 + 3 + 3 + 1, only the epoch's end
    ],
)
def test_val_check_interval_counts_optimizer_steps(accumulate: int, interval, expected: list[int]) -> None:
    config = TrainerConfig(max_epochs=2, accumulate_grad_batches=accumulate, val_check_interval=interval,
                           progress_bar=False)  # fmt: skip
    _, recorder, _ = fit(nn.Linear(FEATURES, CLASSES), batches(10), config)
    per_epoch = expected[-1]
    assert recorder.validations == expected + [per_epoch + step for step in expected]


@pytest.mark.parametrize(
    "checkpoint", [{"every_n_epochs": 2}, {"every_n_epochs": 0}, {"every_n_epochs": 0, "every_n_steps": 4}]
)
def test_last_pt_holds_the_final_state_whatever_the_cadence(checkpoint: dict, tmp_path: Path) -> None:
    config = TrainerConfig(max_epochs=3, progress_bar=False)
    trainer, _, _ = fit(
        nn.Linear(FEATURES, CLASSES), batches(5), config, tmp_path=tmp_path, checkpoint=checkpoint
    )
    last = ckpt.load(tmp_path / "last.pt")
    assert last["global_step"] == trainer.state.global_step == 15 and last["epoch"] == 3
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(last["model"][name], tensor), name


class StopAfterEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        trainer.should_stop = trainer.state.epoch >= self.epoch


def test_fit_from_a_checkpoint_continues_exactly_where_the_run_stopped(tmp_path: Path) -> None:
    # One run of 3 epochs; another stopped after the first and continued by `fit(ckpt_path)` in a fresh Trainer
    # (new model, optimizer, OneCycle schedule): the same learning rates and the same final weights.
    config = TrainerConfig(max_epochs=3, accumulate_grad_batches=2, progress_bar=False)
    data = batches(5)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return TwoGroups()

    whole, whole_lrs, _ = fit(model(), data, config, scheduler="onecycle", tmp_path=tmp_path / "whole")
    first, first_lrs, _ = fit(model(), data, config, scheduler="onecycle", tmp_path=tmp_path / "first",
                              callbacks={"stop": StopAfterEpoch(1)})  # fmt: skip
    assert first.state.global_step == 3 and ckpt.load(tmp_path / "first" / "last.pt")["global_step"] == 3
    rest, rest_lrs, _ = fit(model(), data, config, scheduler="onecycle", tmp_path=tmp_path / "rest",
                            ckpt_path=tmp_path / "first" / "last.pt")  # fmt: skip
    assert rest.state.global_step == whole.state.global_step == 9
    assert first_lrs.lrs + rest_lrs.lrs == whole_lrs.lrs
    for name, tensor in whole.model.state_dict().items():
        torch.testing.assert_close(rest.model.state_dict()[name], tensor, rtol=0, atol=0)
