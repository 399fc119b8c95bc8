"""Classification: cross-entropy on logits, accuracy-like metrics. → `conf/task/classification.yaml`"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from lab.tasks import Task
from lab.tasks.metrics import Metric

log = logging.getLogger(__name__)


class Classification(Task):
    figures = frozenset({"predictions", "confusion_matrix", "pr_curves"})
    output = "softmax"

    def __init__(
        self, loss: nn.Module, metrics: Mapping[str, Metric], input_shape: Sequence[int], num_classes: int
    ) -> None:
        # A top-k metric with k >= the number of classes is always 1 (e.g. top-5 accuracy on 5 classes): not shown.
        kept = {
            name: m for name, m in metrics.items() if not 1 < (getattr(m, "top_k", None) or 1) >= num_classes
        }
        if skipped := sorted(set(metrics) - set(kept)):
            log.info(
                "%s: not reported with %d classes (top_k >= num_classes)", ", ".join(skipped), num_classes
            )
        super().__init__(loss, kept, input_shape)
        self.num_classes = num_classes

    def metric_targets(self, targets: Tensor) -> Tensor:
        # Soft targets (class probabilities, e.g. from batch mixing) count as their most likely class.
        return targets.argmax(1) if targets.is_floating_point() and targets.ndim == 2 else targets
