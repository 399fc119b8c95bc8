"""Regression: real-valued targets per sample, MSE loss, MSE/MAE metrics. → `conf/task/regression.yaml`

With `dataset.standardize_targets` the model learns z-scored targets (losses and metrics read in standard
deviations of the training split); predictions are turned back into the target's units (`lab.inference`).
"""

from __future__ import annotations

from torch import Tensor

from lab.tasks import Task


class Regression(Task):
    output = "identity"

    def adapt(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        # A model with one output unit returns (N, 1) for targets of shape (N,).
        return outputs.reshape(targets.shape).float(), targets.float()
