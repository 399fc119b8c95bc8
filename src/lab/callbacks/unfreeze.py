"""Train the head alone for N epochs, then the backbone too. → `model.unfreeze_at_epoch` (conf/model/backbone/)"""

from __future__ import annotations

import logging
from typing import Any

from lab.callbacks.base import Callback
from lab.errors import UserError

log = logging.getLogger(__name__)


class UnfreezeBackbone(Callback):
    """Once `epoch` epochs are complete, `model.unfreeze()` lets the frozen blocks train.

    Their parameters are in the optimizer from the start (in the `backbone` group, with its lr scale and the
    scheduler's schedule), but receive no gradient while frozen, so no optimizer or scheduler is changed here. It
    happens after validation of epoch N, before that epoch's checkpoint is written; a run resumed past epoch N
    unfreezes before its first step.
    """

    def __init__(self, epoch: int | None) -> None:
        self.epoch = epoch

    def on_fit_start(self, trainer: Any) -> None:
        if self.epoch is None:
            return
        if trainer.distributed:  # DDP registers the parameters that train when it wraps the model
            raise UserError("DistributedDataParallel is built once, with the parameters that train from the start",
                            "model.unfreeze_at_epoch", "under torchrun use model.unfreeze_at_epoch=null (and "
                            "model.freeze=false to fine-tune everything), or train on one process")  # fmt: skip
        self.maybe_unfreeze(trainer)

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.maybe_unfreeze(trainer)

    def maybe_unfreeze(self, trainer: Any) -> None:
        if self.epoch is not None and trainer.state.epoch >= self.epoch and trainer.model.frozen:
            count = trainer.model.unfreeze()
            log.info("epoch %d: backbone unfrozen (%s parameters train from now on)", trainer.state.epoch,
                     f"{count:,}")  # fmt: skip
