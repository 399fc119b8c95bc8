"""Regression: a real-valued target per sample, MSE loss, MSE/MAE metrics. → `conf/task/regression.yaml`"""

from __future__ import annotations

from torch import Tensor

from lab.tasks import Task


class Regression(Task):
    def adapt(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        # A model with one output unit returns (N, 1) for targets of shape (N,).
        return outputs.reshape(targets.shape).float(), targets.float()
