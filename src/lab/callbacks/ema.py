"""An exponential moving average of the weights, validated beside them. → `conf/callbacks/ema.yaml`

`torch.optim.swa_utils.AveragedModel` with `get_ema_multi_avg_fn` keeps the average (parameters and buffers, e.g.
BatchNorm statistics) after every optimizer step. With `warmup` the decay starts low and grows as
`min(decay, (1 + n) / (10 + n))` after n updates, so early averages are not dominated by the random init.

Every validation also evaluates the averaged weights as `val_ema/<metric>` (they can be `checkpoint.monitor`).
`evaluate_with: ema` makes them the weights that count: the final evaluation, `best.pt`'s inference weights
(`lab.models.weights.inference_weights`, used by predict and export) and `train=false` evaluation use them; the raw
weights stay under the checkpoint's `model` so that training resumes exactly. Under DDP every rank averages its
own (identical) weights, so no communication is needed.

Checkpoints hold the averages of the tensors that train only: a frozen block's average is the block itself,
which the checkpoint's `model` (or its frozen part's identity) already gives, so lean checkpoints stay lean.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lab.callbacks.base import Callback
from lab.config import EMAConfig
from lab.models.weights import load_model_state


class EMA(Callback):
    def __init__(
        self,
        decay: float = EMAConfig.decay,
        warmup: bool = EMAConfig.warmup,
        evaluate_with: str = EMAConfig.evaluate_with,
        validate: bool = EMAConfig.validate,
    ) -> None:
        """What each argument means and takes: `EMAConfig` (checked there, before training)."""
        self.decay, self.warmup = float(decay), bool(warmup)
        self.evaluate_with, self.validate = evaluate_with, bool(validate)
        self.averaged: AveragedModel | None = None
        self.model: nn.Module | None = None  # the live model: which of its tensors are frozen now
        self.updates = 0  # update_parameters calls so far (= AveragedModel.n_averaged, kept on the host)
        self.resumed: dict[str, Any] | None = None

    def current_decay(self) -> float:
        """The decay of the next update (the first update copies the weights)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def _average(self, ema: list[Tensor], current: list[Tensor], _n: Tensor) -> None:
        get_ema_multi_avg_fn(self.current_decay())(ema, current, _n)

    def on_fit_start(self, trainer: Any) -> None:
        self.model = trainer.model
        self.averaged = AveragedModel(trainer.model, multi_avg_fn=self._average, use_buffers=True)
        # AveragedModel tests `n_averaged == 0` every update: on the host that is no device synchronisation.
        self.averaged.n_averaged = self.averaged.n_averaged.cpu()
        if self.resumed is not None:  # the frozen tensors left out are the model's own (restored before)
            load_model_state(self.averaged.module, self.resumed["weights"], "callbacks.ema",
                             frozen=set(self.frozen_keys()))  # fmt: skip
            self.averaged.n_averaged.fill_(int(self.resumed["updates"]))
            self.updates = int(self.resumed["updates"])
            self.resumed = None

    def on_optimizer_step(self, trainer: Any) -> None:
        self.averaged.update_parameters(trainer.model)
        self.updates += 1

    def on_validation(self, trainer: Any, metrics: dict[str, float]) -> None:
        """Adds `val_ema/<metric>`: the averaged weights through the same evaluation as the raw ones."""
        if not self.validate or self.averaged is None:
            return
        self.swap(trainer.model)
        try:
            values = trainer.evaluate("val", trainer.batch_limit("val"))
        finally:
            self.swap(trainer.model)
        metrics.update({"val_ema/" + key.split("/", 1)[1]: value for key, value in values.items()})

    def on_fit_end(self, trainer: Any) -> None:
        """`evaluate_with: ema`: what is evaluated after training (when there is no best.pt) are the averages."""
        if self.evaluate_with == "ema" and self.averaged is not None:
            trainer.model.load_state_dict(self.averaged.module.state_dict())

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange the model's weights and buffers with the averages, in place (twice restores them exactly):
        the loop's forward model, a compiled or DDP-wrapped view of the same tensors, then runs the averages."""
        live = [*model.parameters(), *model.buffers()]
        averaged = [*self.averaged.module.parameters(), *self.averaged.module.buffers()]
        for a, b in zip(live, averaged, strict=True):
            kept = a.detach().clone()
            a.copy_(b)
            b.copy_(kept)

    def frozen_keys(self) -> list[str]:
        """state_dict keys of tensors that do not train now (a frozen backbone's): their averages are not kept."""
        return self.model.frozen_keys() if hasattr(self.model, "frozen_keys") else []

    def state_dict(self) -> dict[str, Any]:
        if self.averaged is None:
            weights = self.resumed["weights"]
        else:
            frozen = set(self.frozen_keys())
            weights = {k: v for k, v in self.averaged.module.state_dict().items() if k not in frozen}
        return {"weights": weights, "updates": self.updates,
                "inference_weights": self.evaluate_with == "ema"}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resumed = state  # applied when the averaged model is built (on_fit_start)
        self.updates = int(state["updates"])
