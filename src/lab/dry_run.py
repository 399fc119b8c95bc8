"""Before the first step: use once what some library classes check only when used, so that a bad value ends the run
with one line instead of a traceback minutes in (or a silently wrong run).

On two training samples: one transform call (`augment`, `mix`), one forward and one loss call (a loss must give one
number); on a throw-away optimizer over a copy of the real parameter groups: the schedulers built as for training
and stepped once (a `step_size` or `T_max` of 0 divides by zero there, a negative `max_lr` gives a negative lr).
Nothing of the run changes: the model's weights and BatchNorm statistics, the optimizer and the RNGs are as they
were. An exception raised by your own class (not a library's) keeps its traceback.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lab.config import LIBRARIES, library_error
from lab.errors import UserError


def dry_run(cfg: DictConfig, splits: Any, model: Any, task: Any, optimizer: Any, augment: Any, mix: Any,
            total_steps: int, device: Any) -> None:  # fmt: skip
    if len(splits.train):  # (an empty split is named by the data checks)
        with keep_rng(torch.device(device)):
            x, y = example_batch(splits, device)
            if augment is not None:
                x = library_call(lambda: augment(x), cfg.augment, "augment")
            if mix is not None:
                x, y = library_call(lambda: mix(x, y), cfg.mix, "mix")
            check_loss(cfg.task.loss, model, task, x, y)
    check_schedulers(cfg, optimizer, total_steps)


@contextlib.contextmanager
def keep_rng(device: torch.device) -> Iterator[None]:
    """Python's and torch's generators (the device's too) as they were before: the run draws the same numbers."""
    state = random.getstate()
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        yield
    random.setstate(state)


def example_batch(splits: Any, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Two training samples, collated and preprocessed as the loaders do."""
    from torch.utils.data import default_collate

    x, y = default_collate([splits.train[i] for i in range(min(2, len(splits.train)))])
    x, y = x.to(device), y.to(device)
    return (splits.transform(x) if splits.transform is not None else x), y


def library_call(call: Callable[[], Any], node: DictConfig, key: str) -> Any:
    """`call()`; what a library class raises is one line naming `key`, what your class raises keeps its traceback."""
    try:
        return call()
    except Exception as e:
        if not str(node.get("_target_", "")).startswith(LIBRARIES):
            raise
        raise library_error(e, key, str(node._target_)) from None


def check_loss(node: DictConfig, model: Any, task: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    was_training = model.training
    model.eval()  # BatchNorm's running statistics stay as they are
    try:
        with torch.no_grad():
            outputs, targets = task.adapt(model(x), y)
            loss = library_call(lambda: task.loss(outputs, targets), node, "task.loss")
    finally:
        model.train(was_training)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        key = "task.loss.reduction" if "reduction" in node else "task.loss"
        raise UserError(f"the loss gives {shape}, not one number to minimise", key,
                        "use a reduction that averages or sums (e.g. task.loss.reduction=mean)")  # fmt: skip


def check_schedulers(cfg: DictConfig, optimizer: Any, total_steps: int) -> None:
    """The schedulers, built over a copy of the optimizer's groups, stepped once: every lr stays a number >= 0."""
    from lab.optim import build_schedulers

    node = cfg.scheduler
    params = [p for group in optimizer.param_groups for p in group["params"]][:1]
    device = params[0].device if params else "cpu"
    groups = []
    for group in optimizer.param_groups:
        param = torch.zeros(1, device=device, requires_grad=True)
        param.grad = torch.zeros_like(param)
        groups.append(
            {**{k: v for k, v in group.items() if k not in ("params", "initial_lr")}, "params": [param]}
        )
    # The same class, as a scheduler may read its keys (betas, momentum); SGD for a class that takes more arguments.
    try:
        throwaway = type(optimizer)(groups)
    except TypeError:
        throwaway = torch.optim.SGD([{"params": g["params"], "lr": g["lr"]} for g in groups])
    schedulers = build_schedulers(node, throwaway, total_steps)
    try:
        check_learning_rates(throwaway, node)
        # No optimizer step: it would run torch's global optimizer hooks (yours too) for a step that never was;
        # torch's warning that the scheduler stepped first is about this throw-away optimizer only.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", re.escape("Detected call of `lr_scheduler.step()` before"), UserWarning
            )
            schedulers.step_after_optimizer(1)
            schedulers.step_after_epoch({schedulers.monitor: 0.0} if schedulers.monitor else {})
    except UserError:
        raise
    except Exception as e:
        if not str(node.get("_target_") or "").startswith(LIBRARIES):
            raise
        # StepLR's `step_size`, CosineAnnealingLR's `T_max`: an integer 0 that the first step divides by.
        zero = [k for k, v in node.items() if isinstance(e, ZeroDivisionError) and type(v) is int and v == 0]
        raise library_error(e, f"scheduler.{zero[0]}" if zero else "scheduler", str(node._target_)) from None
    check_learning_rates(throwaway, node)


def check_learning_rates(optimizer: Any, node: DictConfig) -> None:
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        if math.isfinite(lr) and lr >= 0:
            continue
        args = OmegaConf.to_container(node, resolve=True)
        negative = [
            k for k, v in args.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0
        ]
        key = f"scheduler.{negative[0]}" if negative else "scheduler"
        raise UserError(f"{node._target_} sets the learning rate to {lr:g}", key,
                        f"give {key} a value that keeps the learning rate >= 0")  # fmt: skip
