"""Stop when the monitored metric stops improving. → `conf/callbacks/early_stopping.yaml`"""

from __future__ import annotations

import logging
from typing import Any

from lab.callbacks.base import Callback
from lab.checkpoint import improved
from lab.config import EarlyStoppingConfig

log = logging.getLogger(__name__)


class EarlyStopping(Callback):
    def __init__(
        self,
        monitor: str,
        mode: str,
        patience: int | None = EarlyStoppingConfig.patience,
        min_delta: float = EarlyStoppingConfig.min_delta,
    ) -> None:
        """`patience`: validations without an improvement of `monitor` by more than `min_delta`; None: off.

        It counts validations, not epochs: one per epoch by default, more with `trainer.val_check_interval`,
        fewer with `trainer.check_val_every_n_epoch`. `monitor` is checked against the task's metrics before
        training (`lab.train.build`).
        """
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.bad_validations = 0

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        value = metrics.get(self.monitor)
        if value is not None and improved(value, self.best, self.mode, self.min_delta):
            self.best, self.bad_validations = value, 0
        else:
            self.bad_validations += 1
        if self.patience and self.bad_validations >= self.patience:
            log.info("early stopping: %s has not improved for %d validations", self.monitor, self.patience)
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_validations = state["best"], state["bad_validations"]
