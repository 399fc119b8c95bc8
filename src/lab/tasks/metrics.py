"""lab's default metrics (`conf/task/*.yaml`), and `Metric`: what a task accepts in `task.metrics`.

`import torchmetrics` costs seconds of CPU at start-up (its root package imports every metric, and with them
torchvision, scipy and matplotlib), so the defaults are these few, written here with the part of torchmetrics' API
that lab uses: `update(preds, target)`, `compute()`, `reset()`, `persistent(mode)`, `state_dict`, `.to(device)`.
Any torchmetrics metric still works in `task.metrics`: it is imported only by a run that names it.

Their states are sums and counts in buffers (in the state_dict, so a mid-epoch checkpoint holds them). Under DDP
`compute()` sums them over the ranks, as torchmetrics does, on a copy: the local states stay as they were.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

F1_AVERAGES = ("micro", "macro", "weighted")


class Metric(Protocol):
    """What a task's metric must offer: lab's own metrics and every torchmetrics `Metric` do."""

    def update(self, preds: Tensor, target: Tensor) -> None: ...
    def compute(self) -> Tensor: ...
    def reset(self) -> None: ...
    def persistent(self, mode: bool = False) -> None: ...
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...
    def to(self, *args: Any, **kwargs: Any) -> Any: ...


def _at_least_one(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")


def _probability(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a probability strictly between 0 and 1, got {threshold!r}")


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den is 0 (torchmetrics' value for an empty count)."""
    num, den = num.float(), den.float()
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))


class SumMetric(nn.Module):
    """A metric whose states are sums: `reset` zeroes them, `compute` reads `value(sums)` over every rank."""

    def state(self, name: str, shape: tuple[int, ...] = (), dtype: torch.dtype = torch.long) -> None:
        self.register_buffer(name, torch.zeros(shape, dtype=dtype), persistent=True)

    def reset(self) -> None:
        for buffer in self.buffers(recurse=False):
            buffer.zero_()

    def persistent(self, mode: bool = False) -> None:
        """Whether the states are in `state_dict` (torchmetrics' switch; lab's are by default)."""
        for name, _ in self.named_buffers(recurse=False):
            if mode:
                self._non_persistent_buffers_set.discard(name)
            else:
                self._non_persistent_buffers_set.add(name)

    def compute(self) -> Tensor:
        sums = dict(self.named_buffers(recurse=False))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sums = {name: s.clone() for name, s in sums.items()}
            for s in sums.values():
                dist.all_reduce(s)
        return self.value(**sums)

    def value(self, **sums: Tensor) -> Tensor:
        raise NotImplementedError


class MulticlassAccuracy(SumMetric):
    """Share of samples whose target is among the `top_k` highest scores (torchmetrics' micro average).

    A `top_k` above `num_classes` is accepted: the classification task leaves such a metric out (always 1)."""

    def __init__(self, num_classes: int, top_k: int = 1) -> None:
        super().__init__()
        _at_least_one(num_classes, "num_classes")
        _at_least_one(top_k, "top_k")
        self.num_classes, self.top_k = num_classes, top_k
        self.state("correct")
        self.state("total")

    def update(self, preds: Tensor, target: Tensor) -> None:
        target = target.long()
        if preds.ndim == target.ndim:  # already class indices
            hit = preds.long() == target
        elif self.top_k == 1:
            hit = preds.argmax(1) == target
        else:
            top = preds.topk(min(self.top_k, preds.shape[1]), dim=1).indices
            hit = (top == target.unsqueeze(1)).any(1)
        self.correct += hit.sum()
        self.total += target.numel()

    def value(self, correct: Tensor, total: Tensor) -> Tensor:
        return _ratio(correct, total)


class MultilabelAccuracy(SumMetric):
    """Share of all sample × label decisions that are right; a label is predicted when the sigmoid of its logit is
    at least `threshold` (as predict.py and the export decide)."""

    def __init__(self, num_labels: int, threshold: float = 0.5) -> None:
        super().__init__()
        _at_least_one(num_labels, "num_labels")
        _probability(threshold)
        self.num_labels, self.threshold = num_labels, float(threshold)
        self.state("correct")
        self.state("total")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.correct += ((preds.sigmoid() >= self.threshold) == target.bool()).sum()
        self.total += target.numel()

    def value(self, correct: Tensor, total: Tensor) -> Tensor:
        return _ratio(correct, total)


class MultilabelF1Score(SumMetric):
    """F1 per label from true/false positives and false negatives, averaged: `macro` the plain mean over labels
    (a label never present nor predicted counts as 0, as in torchmetrics), `weighted` by each label's positives,
    `micro` from the counts summed over labels. Predictions as in `MultilabelAccuracy`."""

    def __init__(self, num_labels: int, threshold: float = 0.5, average: str = "macro") -> None:
        super().__init__()
        _at_least_one(num_labels, "num_labels")
        _probability(threshold)
        if average not in F1_AVERAGES:
            raise ValueError(f"average must be one of {', '.join(F1_AVERAGES)}, got {average!r}")
        self.num_labels, self.threshold, self.average = num_labels, float(threshold), average
        for name in ("tp", "fp", "fn"):
            self.state(name, (num_labels,))

    def update(self, preds: Tensor, target: Tensor) -> None:
        predicted, actual = preds.sigmoid() >= self.threshold, target.bool()
        dims = tuple(d for d in range(predicted.ndim) if d != 1)  # all but the label axis
        self.tp += (predicted & actual).sum(dims)
        self.fp += (predicted & ~actual).sum(dims)
        self.fn += (~predicted & actual).sum(dims)

    def value(self, tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
        if self.average == "micro":
            tp, fp, fn = tp.sum(), fp.sum(), fn.sum()
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        if self.average == "weighted":
            return _ratio((f1 * (tp + fn)).sum(), (tp + fn).sum())
        return f1.mean()


class MeanSquaredError(SumMetric):
    """Mean of (preds - target)² over every element."""

    def __init__(self) -> None:
        super().__init__()
        self.state("total_error", dtype=torch.float32)
        self.state("total")

    def error(self, diff: Tensor) -> Tensor:
        return diff * diff

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape:  # (N, 1) against (N,) would broadcast to N × N
            raise ValueError(f"preds {list(preds.shape)} and target {list(target.shape)} differ in shape")
        self.total_error += self.error(preds.float() - target.float()).sum()
        self.total += target.numel()

    def value(self, total_error: Tensor, total: Tensor) -> Tensor:
        return _ratio(total_error, total)


class MeanAbsoluteError(MeanSquaredError):
    """Mean of |preds - target| over every element."""

    def error(self, diff: Tensor) -> Tensor:
        return diff.abs()
