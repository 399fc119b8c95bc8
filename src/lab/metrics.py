"""Running metrics of one stage: the mean loss plus the task's metrics, kept on the device.

`update` only keeps references to a batch's (detached) loss, outputs and targets. They are folded into the loss sum
and the metrics in one batched update every `FOLD_EVERY` batches and whenever the epoch's values are read (a logging
window folds the losses alone), so the loop adds no host-device synchronisation per step: `compute()` is the only
one. Under DDP, each metric sums its states across ranks in its `compute()` (lab's own and torchmetrics' do) and
the loss sum is all-reduced with `reduce`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lab.errors import UserError
from lab.tasks import Task


class Sums:
    """The loss sum, sample count and metric states of one span (an epoch, a logging window, a split)."""

    def __init__(self, task: Task, device: torch.device, loss_only: bool = False) -> None:
        self.device = device
        metrics = {} if loss_only else task.metrics
        self.metrics = {name: copy.deepcopy(m).to(device) for name, m in metrics.items()}
        for metric in self.metrics.values():
            metric.persistent(True)  # their states are part of a mid-epoch checkpoint
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.count = 0
        for metric in self.metrics.values():
            metric.reset()

    def add_loss(self, loss_sum: Tensor, count: int) -> None:
        self.loss += loss_sum
        self.count += count

    def update_metrics(self, outputs: Tensor, targets: Tensor) -> None:
        for metric in self.metrics.values():
            metric.update(outputs, targets)

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss.detach().cpu(),
            "count": self.count,
            "metrics": {name: metric.state_dict() for name, metric in self.metrics.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.loss = state["loss"].to(self.device)
        self.count = int(state["count"])
        for name, metric_state in state.get("metrics", {}).items():
            if name in self.metrics:
                try:
                    self.metrics[name].load_state_dict(metric_state)
                except RuntimeError:  # e.g. a checkpoint written with another class for this metric
                    raise UserError(f"the checkpoint's mid-epoch state of metric {name!r} does not fit "
                                    f"{type(self.metrics[name]).__name__}", f"task.metrics.{name}",
                                    "resume with the metric the run was started with, or from an "
                                    "epoch-end checkpoint") from None  # fmt: skip

    def compute(self, stage: str, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        values = torch.stack([self.loss.float(), torch.tensor(float(self.count), device=self.device)])
        if reduce is not None:  # all-reduce across ranks under DDP
            values = reduce(values)
        loss, count = values.tolist()
        result = {f"{stage}/loss": loss / max(count, 1.0)}
        if count:
            with warnings.catch_warnings():  # torchmetrics: loaded states count as no `update` call
                warnings.filterwarnings("ignore", message=".*compute.*before.*update", category=UserWarning)
                for name, metric in self.metrics.items():
                    result[f"{stage}/{name}"] = float(metric.compute())
        return result


class Metrics:
    """`epoch` sums (loss and metrics), and optionally `window` sums of the loss alone, which the loop logs and
    resets every `log_every_n_steps` (the task's metrics are logged per epoch: over a few steps they are noise, and
    updating them twice would cost the loop more than their value)."""

    FOLD_EVERY = 32

    def __init__(self, task: Task, device: torch.device, window: bool = False) -> None:
        self.task, self.device = task, device
        self.epoch = Sums(task, device)
        self.window = Sums(task, device, loss_only=True) if window else None
        self.pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self.losses_folded = 0  # how many of `pending` are already in the loss sums

    def reset(self) -> None:
        """Empty again, keeping the metric objects (copying them anew costs more than an epoch of a small model)."""
        self.pending, self.losses_folded = [], 0
        for sums in (self.epoch, self.window):
            if sums is not None:
                sums.reset()

    def update(self, loss: Tensor, outputs: Tensor, targets: Tensor) -> None:
        self.pending.append((loss.detach(), outputs.detach(), targets))
        if len(self.pending) >= self.FOLD_EVERY:
            self.fold()

    @torch.no_grad()
    def fold_losses(self) -> None:
        """The pending batches' losses into the loss sums: all that a logging window reads."""
        new = self.pending[self.losses_folded :]
        if not new:
            return
        self.losses_folded = len(self.pending)
        losses, _, targets = zip(*new, strict=True)
        sizes = [len(t) for t in targets]
        weights = torch.tensor(sizes, dtype=torch.float32).to(self.device, non_blocking=True)
        loss_sum = (torch.stack(losses).float() * weights).sum()
        for sums in (self.epoch, self.window):
            if sums is not None:
                sums.add_loss(loss_sum, sum(sizes))

    @torch.no_grad()
    def fold(self) -> None:
        """Everything pending: the losses, then all outputs and targets into the metrics in one update."""
        self.fold_losses()
        if not self.pending:
            return
        _, outputs, targets = zip(*self.pending, strict=True)
        self.pending, self.losses_folded = [], 0
        self.epoch.update_metrics(torch.cat(outputs).float(), self.task.metric_targets(torch.cat(targets)))

    def compute(self, stage: str, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        self.fold()
        return self.epoch.compute(stage, reduce)

    def compute_window(
        self, stage: str, reduce: Callable[[Tensor], Tensor] | None = None
    ) -> dict[str, float]:
        """The window's values (the loss); the window starts again empty. The task's metrics wait for the next
        full fold: updating them at every logging step would cost the loop more than the window is worth."""
        self.fold_losses()
        values = self.window.compute(stage, reduce)
        self.window.reset()
        return values

    def state_dict(self) -> dict[str, Any]:
        self.fold()
        return {"epoch": self.epoch.state_dict(), "window": self.window.state_dict() if self.window else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending, self.losses_folded = [], 0
        self.epoch.load_state_dict(state["epoch"])
        if self.window is not None and state.get("window"):
            self.window.load_state_dict(state["window"])
