"""Optimizer and LR schedulers from `conf/optimizer/*.yaml` and `conf/scheduler/*.yaml`.

Both configs `_target_` torch's own classes with `_partial_: true`; this file only binds them to the model's
trainable parameters and adds an optional linear warm-up, chained in front of the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lab.config import build
from lab.errors import UserError

# Keys of a scheduler config that are ours, not the scheduler class's.
SCHEDULER_KEYS = ("interval", "warmup_steps", "monitor")


def trainable_parameters(model: nn.Module) -> list[dict[str, Any]]:
    """Parameter groups for the optimizer: frozen parameters are never handed to it.

    A model may define `param_groups()` (e.g. a backbone with its own lr scale); otherwise one group.
    """
    if hasattr(model, "param_groups"):
        return model.param_groups()
    return [{"params": [p for p in model.parameters() if p.requires_grad], "name": "all"}]


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = [g for g in trainable_parameters(model) if g["params"]]
    if not groups:
        raise UserError("the model has no trainable parameters", "model.freeze", "unfreeze at least the head")
    optimizer = build(cfg, "optimizer", groups)
    for group in optimizer.param_groups:  # e.g. a backbone's discriminative lr (lab.models.backbone)
        group["lr"] *= group.get("lr_scale", 1.0)
    return optimizer


@dataclass
class Schedulers:
    """`main` steps every `interval` (epoch or step); `warmup` steps per optimizer step for `warmup_steps`."""

    main: Any = None
    warmup: Any = None
    interval: str = "epoch"
    warmup_steps: int = 0
    monitor: str | None = None  # ReduceLROnPlateau's metric

    def step_after_optimizer(self, global_step: int) -> None:
        if self.warmup is not None and global_step <= self.warmup_steps:
            self.warmup.step()
        if self.main is not None and self.interval == "step":
            self.main.step()

    def step_after_epoch(self, metrics: dict[str, float]) -> None:
        if self.main is None or self.interval != "epoch":
            return
        if isinstance(self.main, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if self.monitor in metrics:
                self.main.step(metrics[self.monitor])
        else:
            self.main.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "main": self.main.state_dict() if self.main is not None else None,
            "warmup": self.warmup.state_dict() if self.warmup is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("main", "warmup"):
            if getattr(self, name) is not None and state.get(name) is not None:
                getattr(self, name).load_state_dict(state[name])


def build_schedulers(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, max_epochs: int
) -> Schedulers:
    args = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in SCHEDULER_KEYS}
    interval = str(cfg.get("interval", "epoch"))
    if interval not in ("epoch", "step"):
        raise UserError(f"unknown value {interval!r}", "scheduler.interval", "use epoch or step")
    warmup_steps = int(cfg.get("warmup_steps") or 0)
    if warmup_steps < 0:
        raise UserError(f"must be >= 0, got {warmup_steps}", "scheduler.warmup_steps", "")
    main = None
    if args.get("_target_"):
        if "total_steps" in args and args["total_steps"] is None:  # OneCycleLR: known only now
            args["total_steps"] = steps_per_epoch * max_epochs
        main = build(OmegaConf.create(args), "scheduler", optimizer)
    warmup = None
    if warmup_steps:  # lr x (step + 1) / warmup_steps for the first warmup_steps steps
        warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1 / warmup_steps, total_iters=max(warmup_steps - 1, 1)
        )
    return Schedulers(main, warmup, interval, warmup_steps, cfg.get("monitor"))
