"""Tasks: what is specific to a problem, so that the loop in `lab.trainer` is not. → `conf/task/*.yaml`

A task owns the loss (any `nn.Module`, e.g. `torch.nn.CrossEntropyLoss`), the metrics (built from `task.metrics`:
lab's own from `lab.tasks.metrics`, or any torchmetrics metric; logged as `<stage>/<name>` beside `<stage>/loss`),
the shape of one input (for the model summary and graph), which of the monitor's figures make sense for it, and how
outputs become predictions (`output`: softmax, sigmoid with a `threshold`, or identity in the target's units; see
`lab.inference`). A new task is a subclass of `Task` (one file) and a YAML file naming it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lab.errors import UserError
from lab.tasks.metrics import Metric

#: Names lab logs itself under `<stage>/`, or beside them: a metric of the same name would overwrite them.
RESERVED_NAMES = frozenset({"loss", "epoch", "step", "global_step", "lr", "epoch_time", "samples_per_sec",
                            "grad_norm"})  # fmt: skip


class Task:
    """The loss and metrics of a problem. Subclasses adapt model outputs and targets to them (`adapt`)."""

    #: The monitor's figures this task can draw (see `lab.monitor`): a subset of
    #: {"predictions", "confusion_matrix", "pr_curves"}.
    figures: frozenset[str] = frozenset()
    #: How outputs become predictions (`lab.inference.OUTPUTS`): what predict.py and the export answer.
    output: str = "identity"

    def __init__(self, loss: nn.Module, metrics: Mapping[str, Metric], input_shape: Sequence[int]) -> None:
        for name in metrics:
            if name in RESERVED_NAMES:
                raise UserError(f"metric name {name!r} is one lab logs itself", f"task.metrics.{name}",
                                f"rename the metric, e.g. task.metrics.my_{name}")  # fmt: skip
        self.loss = loss
        self.metrics = dict(metrics)
        self.input_shape = tuple(int(n) for n in input_shape)

    def metric_names(self) -> list[str]:
        """What each stage reports: `loss` and the task's metrics (`val/<name>`, `train/<name>`, ...)."""
        return ["loss", *self.metrics]

    def adapt(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Model outputs and batch targets as the loss expects them."""
        return outputs, targets

    def metric_targets(self, targets: Tensor) -> Tensor:
        """Targets as the metrics expect them (e.g. class indices where the loss takes soft targets)."""
        return targets

    def example_input(self, device: torch.device | str = "cpu") -> Tensor:
        """Zeros of one input's shape: the model summary must not consume the seeded RNG."""
        return torch.zeros((1, *self.input_shape), device=device)
