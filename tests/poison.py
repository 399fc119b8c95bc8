"""A callback for tests: from `after_steps` on, every gradient is NaN, so that a run diverges on purpose.

It is also a user callback added from the command line: `+callbacks.poison={_target_: poison.NaNGradients}`.
"""

from typing import Any

from lab import Callback


class NaNGradients(Callback):
    def __init__(self, after_steps: int = 0) -> None:
        self.after_steps = after_steps

    def on_after_backward(self, trainer: Any) -> None:
        if trainer.state.global_step < self.after_steps:
            return
        for param in trainer.model.parameters():
            if param.grad is not None:
                param.grad.fill_(float("nan"))
