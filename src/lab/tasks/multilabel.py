"""Multi-label classification: any number of labels per sample. → `conf/task/multilabel.yaml`

Targets are multi-hot float vectors (N, num_labels); the loss is `torch.nn.BCEWithLogitsLoss` on the logits,
the metrics multi-label accuracy and F1 (`lab.tasks.metrics`). A sample's predicted labels are those whose sigmoid
probability is at least `threshold` (predict.py, the export and the default metrics use the same one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from lab.errors import UserError
from lab.tasks import Task
from lab.tasks.metrics import Metric


class MultiLabel(Task):
    figures = frozenset({"pr_curves"})
    output = "sigmoid"

    def __init__(
        self,
        loss: nn.Module,
        metrics: Mapping[str, Metric],
        input_shape: Sequence[int],
        num_labels: int,
        threshold: float = 0.5,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise UserError(f"threshold {threshold} is not a probability strictly between 0 and 1",
                            "task.threshold", "use e.g. task.threshold=0.5")  # fmt: skip
        super().__init__(loss, metrics, input_shape)
        self.num_labels, self.threshold = num_labels, float(threshold)

    def adapt(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if targets.ndim != 2 or targets.shape[1] != self.num_labels:
            raise UserError(f"multi-label targets must be multi-hot vectors of {self.num_labels} labels, "
                            f"got shape {list(targets.shape)}", "task",
                            "return a float 0/1 vector per sample from the dataset, or use task=classification")  # fmt: skip
        return outputs.float(), targets.float()

    def metric_targets(self, targets: Tensor) -> Tensor:
        return targets.long()  # integer 0/1 targets, as torchmetrics' multilabel metrics take them
