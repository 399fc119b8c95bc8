"""Stop when the monitored metric stops improving. → `conf/callbacks/early_stopping.yaml`"""

from __future__ import annotations

import logging
from typing import Any

from lab.checkpoint import improved

log = logging.getLogger(__name__)


class EarlyStopping:
    def __init__(self, monitor: str, mode: str, patience: int | None = None, min_delta: float = 0.0) -> None:
        """`patience`: epochs without an improvement of `monitor` by more than `min_delta`; None: off."""
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.bad_epochs = 0

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        value = metrics.get(self.monitor)
        if value is not None and improved(value, self.best, self.mode, self.min_delta):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        if self.patience and self.bad_epochs >= self.patience:
            log.info("early stopping: %s has not improved for %d epochs", self.monitor, self.patience)
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
