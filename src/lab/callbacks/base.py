"""`Callback`: the base class of every callback, with each hook the trainer calls as a documented no-op.

A callback overrides the hooks it needs; the trainer calls only those (a hook left as it is costs nothing per
step). A method whose name starts with `on_` but is no hook (`on_validation_ends`) is refused when the callback is
built, so a misspelled hook never goes silently uncalled.

What a callback may use of the trainer (its public surface; nothing else is promised to stay):

- `trainer.state`: `epoch` (completed epochs), `global_step` (optimizer steps taken), `batch_in_epoch` (batches
  of the current epoch trained), `best` (best value of the monitored metric so far). Read only.
- `trainer.model`: the plain `nn.Module` whose `state_dict` checkpoints hold (never a DDP or compiled wrapper);
  `trainer.network`: what runs — `module` (the model, or its head on cached features), `train_module` (that
  module wrapped in DDP and/or compiled), `eval_module` (the same without the DDP wrapper); `trainer.eval_model`
  is `trainer.network.eval_module`.
- `trainer.optimizer`, `trainer.schedulers`, `trainer.task` (loss, metrics and figures, `lab.tasks`),
  `trainer.class_names`, `trainer.cfg` (the loop's `TrainerConfig`, read only).
- `trainer.loaders`: split name (`train`, `val`, `test`) → loader yielding `(inputs, targets)` batches on the
  device; `trainer.batch_limit(stage)`: how many batches of a split a run uses (its `limit_<stage>_batches` setting);
  `trainer.train_batches`: training batches per epoch, that limit applied.
- `trainer.evaluate(stage, limit)`: the split's metrics (`val/acc`, ...) with the current weights, reduced over
  DDP ranks; `trainer.outputs(stage, limit)`: each batch's `(outputs, loss, targets)` in eval mode.
- `trainer.autocast()`: the run's mixed-precision context; `trainer.prepare(x)`: a batch in the run's memory
  format (channels_last).
- `trainer.loggers`: the logger fan-out (`lab.loggers.Logger`'s methods; false when nothing logs, e.g. on
  ranks other than 0).
- `trainer.monitor`, `trainer.mode`: `checkpoint.monitor` and whether it is maximised or minimised.
- `trainer.device`; `trainer.distributed`: this rank's place in a DDP (torchrun) job, None in one process;
  `trainer.world_size`; `trainer.reduce(tensor)`: the sum over the ranks (None in one process).
- `trainer.should_stop = True`: stop after the current epoch or validation (checkpoints written, normal exit).

`state_dict()`/`load_state_dict()` put a callback's state into every checkpoint and take it back on resume.
"""

from __future__ import annotations

from typing import Any

from lab.errors import UserError

# `lab.trainer.Trainer`, seen through the surface above (named, not imported: the trainer imports this module).
Trainer = Any


class Callback:
    """Subclass it and override the hooks you need; each is called as `hook(trainer, *args)`."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step (also of a resumed run: `trainer.state` is already the resumed one)."""

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        """Before each training epoch's first batch."""

    def on_after_backward(self, trainer: Trainer) -> None:
        """Gradients of a whole accumulation window are in `.grad` (unscaled only later), before the step."""

    def on_optimizer_step(self, trainer: Trainer) -> None:
        """After each optimizer step (`trainer.state.global_step` counts it already)."""

    def on_validation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After a validation, before anything uses its `metrics`: add your own to them (e.g. `val_ema/acc`)."""

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After a validation is logged, before its checkpoints: `metrics` holds the train and val metrics."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last epoch, the last checkpoint on disk."""

    def on_final_evaluation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After the final evaluation of the best weights (`final/...` in `metrics.json`), also with train=false."""

    def state_dict(self) -> dict[str, Any]:
        """What the callback needs to continue after a resume; saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict()` returned (before `on_fit_start` of the resumed run)."""


HOOKS = tuple(name for name in vars(Callback) if name.startswith("on_"))


def overrides(callback: Callback, hook: str) -> bool:
    """Whether `callback`'s class defines `hook` itself (the base class's no-op is never called)."""
    return getattr(type(callback), hook) is not getattr(Callback, hook)


def check_callback(callback: Any, name: str) -> None:
    """Refuse what is no `Callback`, or has an `on_...` method that is no hook (a misspelling never called)."""
    key = f"callbacks.{name}"
    if not isinstance(callback, Callback):
        raise UserError(f"{type(callback).__module__}.{type(callback).__qualname__} is no lab.Callback", key,
                        "subclass lab.Callback (from lab import Callback) and override the hooks you need")  # fmt: skip
    cls = type(callback)
    unknown = sorted(
        a for a in dir(cls) if a.startswith("on_") and a not in HOOKS and callable(getattr(cls, a))
    )
    if unknown:
        raise UserError(f"{type(callback).__qualname__}.{unknown[0]} is no hook and would never be called", key,
                        f"name it one of {', '.join(HOOKS)}")  # fmt: skip


def hook_table(callbacks: dict[str, Any]) -> dict[str, list[Any]]:
    """hook name → the bound methods to call, in callback order: only hooks a callback overrides."""
    for name, callback in callbacks.items():
        check_callback(callback, name)
    return {hook: [getattr(cb, hook) for cb in callbacks.values() if overrides(cb, hook)] for hook in HOOKS}
