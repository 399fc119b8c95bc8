"""Experiment loggers, built from `conf/logger/*.yaml`: one small interface, one file per backend, a fan-out.

The training loop only ever talks to a `LoggerFanOut`; it never imports a logging library. A backend subclasses
`Logger` (or is refused) and overrides the methods it supports; the others do nothing for it (CSV has no place for
text, say).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

if TYPE_CHECKING:
    from pathlib import Path

    from torch import Tensor, nn


class Logger:
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars at an optimizer step: `train/loss`, `val/acc`, `lr`, ..."""

    def log_hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The flattened resolved config with the final metrics, so runs can be compared side by side."""

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        """Free text: the resolved config as YAML, the model summary."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The resolved config as a plain dict, once before training (W&B's run config)."""

    # Media: a backend without a place for one of these ignores it.
    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        """A matplotlib figure (closed afterwards by the caller)."""

    def log_images(self, tag: str, images: Tensor, step: int) -> None:
        """A batch of images (N, C, H, W) with values in [0, 1], shown as one grid."""

    def log_histogram(self, tag: str, values: Tensor, step: int) -> None:
        """The distribution of a tensor's values (weights, gradients)."""

    def log_histograms(self, values: Mapping[str, Tensor], step: int) -> None:
        """Several at once (`tag → tensor`), as the monitor logs them; a backend may batch the work."""
        for tag, tensor in values.items():
            self.log_histogram(tag, tensor, step)

    def log_graph(self, model: nn.Module, example_input: Tensor) -> None:
        """The model's graph, traced on `example_input`."""

    def log_pr_curves(
        self, tag: str, targets: Tensor, probs: Tensor, class_names: list[str], step: int
    ) -> None:
        """One precision-recall curve per class, from integer `targets` (N,) and softmax `probs` (N, classes)."""

    def log_embedding(
        self, tag: str, features: Tensor, labels: list[str], images: Tensor | None, step: int
    ) -> None:
        """Points for an embedding projector: `features` (N, D) with a label and a thumbnail (N, C, H, W) each."""

    def log_export(self, path: Path) -> None:
        """An exported model folder (`export/`: model.pt, model.onnx, ...), e.g. as a W&B model artifact."""

    def watch(self, model: nn.Module) -> None:
        """Let the backend hook into the model (W&B's gradient/parameter histograms)."""

    def resume(self, global_step: int, state: Mapping[str, Any]) -> None:
        """Called before anything is logged when training resumes from a checkpoint at `global_step`."""

    def state_dict(self) -> dict[str, Any]:
        """What the backend needs to continue this run later (saved in checkpoints), e.g. a W&B run id."""
        return {}

    def close(self, status: str = "success") -> None:
        """Flush and release files; `status` is success, failed or interrupted."""


class LoggerFanOut(Logger):
    """Forwards every call to each configured logger (none at all for `logger=none` or on non-zero ranks).

    Each of `Logger`'s methods is written out here: a method that is not is no logging call at all.
    """

    def __init__(self, loggers: Mapping[str, Logger]) -> None:
        self.loggers = dict(loggers)

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers.values():
            logger.log_metrics(metrics, step)

    def log_hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        for logger in self.loggers.values():
            logger.log_hparams(params, metrics)

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        for logger in self.loggers.values():
            logger.log_text(tag, text, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        for logger in self.loggers.values():
            logger.log_config(config)

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        for logger in self.loggers.values():
            logger.log_figure(tag, figure, step)

    def log_images(self, tag: str, images: Tensor, step: int) -> None:
        for logger in self.loggers.values():
            logger.log_images(tag, images, step)

    def log_histogram(self, tag: str, values: Tensor, step: int) -> None:
        for logger in self.loggers.values():
            logger.log_histogram(tag, values, step)

    def log_histograms(self, values: Mapping[str, Tensor], step: int) -> None:
        for logger in self.loggers.values():
            logger.log_histograms(values, step)

    def log_graph(self, model: nn.Module, example_input: Tensor) -> None:
        for logger in self.loggers.values():
            logger.log_graph(model, example_input)

    def log_pr_curves(
        self, tag: str, targets: Tensor, probs: Tensor, class_names: list[str], step: int
    ) -> None:
        for logger in self.loggers.values():
            logger.log_pr_curves(tag, targets, probs, class_names, step)

    def log_embedding(
        self, tag: str, features: Tensor, labels: list[str], images: Tensor | None, step: int
    ) -> None:
        for logger in self.loggers.values():
            logger.log_embedding(tag, features, labels, images, step)

    def log_export(self, path: Path) -> None:
        for logger in self.loggers.values():
            logger.log_export(path)

    def watch(self, model: nn.Module) -> None:
        for logger in self.loggers.values():
            logger.watch(model)

    def resume(self, global_step: int, state: Mapping[str, Any]) -> None:
        for name, logger in self.loggers.items():
            logger.resume(global_step, state.get(name, {}))

    def state_dict(self) -> dict[str, Any]:
        return {name: logger.state_dict() for name, logger in self.loggers.items()}

    def close(self, status: str = "success") -> None:
        for logger in self.loggers.values():
            logger.close(status)


def build_loggers(cfg: DictConfig | None) -> LoggerFanOut:
    """`cfg.logger` maps a name to a `_target_` config, e.g. `{tensorboard: {...}, csv: {...}}`."""
    from lab.config import build
    from lab.errors import UserError

    # A backend's own check (bad option, missing package) is one line; an unknown argument too.
    loggers = {name: build(conf, f"logger.{name}") for name, conf in (cfg or {}).items() if conf is not None}
    for name, logger in loggers.items():
        if not isinstance(logger, Logger):
            kind = f"{type(logger).__module__}.{type(logger).__qualname__}"
            raise UserError(f"{kind} is no lab.loggers.Logger", f"logger.{name}",
                            "subclass lab.loggers.Logger and override the methods your backend supports")  # fmt: skip
    return LoggerFanOut(loggers)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}`; lists become strings (hparams take scalars only)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif value is None or isinstance(value, (list, tuple)):
            flat[name] = str(value)
        else:
            flat[name] = value
    return flat
