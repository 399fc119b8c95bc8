"""The training loop: fit, validate, test. Driven by `conf/trainer/*.yaml`.

It sees a model, a task (loss and metrics, `lab.tasks`), loaders, an optimizer, schedulers, a logger fan-out, a
checkpointer and callbacks, and nothing else: no loss, metric, dataset class or logging library is named here.
Metrics accumulate on the device and are read back once per logging interval, so the loop adds no host-device
synchronisation per step.

Callbacks (`conf/callbacks/*.yaml`, see `lab.callbacks`) may define any of these methods, each called as
`hook(trainer, *args)`: `on_fit_start`, `on_train_epoch_start`, `on_after_backward` (gradients present, before
the optimizer step), `on_optimizer_step` (after each one), `on_validation(metrics)` (may add metrics of its own to
the validation's, e.g. `val_ema/acc`), `on_validation_end(metrics)` (the epoch's train and val metrics), `on_fit_end`, and
`on_final_evaluation(metrics)` (called by `lab.train.run` after evaluating the best weights, also with
`train=false`). A callback stops training after the current epoch (checkpoints written, normal exit) with
`trainer.should_stop = True`; one with `state_dict()`/`load_state_dict()` has its state in every checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from lab import checkpoint as ckpt
from lab.config import parse_duration
from lab.data.augment import AugmentedLoader
from lab.metrics import Metrics
from lab.optim import Schedulers
from lab.tasks import Task

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """A stop signal arrived; `last.pt` was written. Exit code 128 + signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class TrainingDiverged(Exception):
    """The loss became NaN/Inf; the last good checkpoint on disk is left untouched."""


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # batches of the current epoch already trained (for mid-epoch resume)
    best: float | None = None  # best value of the monitored metric so far


def limit_batches(limit: int | float | None, num_batches: int) -> int:
    """`limit_*_batches`: None → all, int → that many, float → that fraction (at least one)."""
    if limit is None:
        return num_batches
    if isinstance(limit, float):
        return max(1, int(num_batches * limit))
    return min(num_batches, limit)


class Trainer:
    def __init__(
        self,
        cfg: DictConfig,
        model: nn.Module,
        task: Task,
        optimizer: torch.optim.Optimizer,
        schedulers: Schedulers,
        loaders: dict[str, Any],
        loggers: Any,
        checkpointer: ckpt.Checkpointer,
        device: torch.device,
        checkpoint_extra: Callable[[], dict[str, Any]],
        callbacks: dict[str, Any] | None = None,
        forward_model: nn.Module | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        show_progress: bool = True,
        class_names: Sequence[str] = (),
        mix: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.task = task
        self.class_names = list(class_names)  # for callbacks that name classes (the monitor's figures)
        self.model = model  # the plain module: its state_dict is what checkpoints hold
        # What batches go through: the model, a part of it (e.g. a head on cached features) or a DDP wrapper of
        # either; compiled when `trainer.compile`.
        forward_model = model if forward_model is None else forward_model
        self.forward_model: nn.Module = torch.compile(forward_model) if cfg.compile else forward_model
        # Evaluation runs without the DDP wrapper: each rank evaluates its own shard (sizes may differ by one) and
        # only the metric sums are reduced, so no collective op of the wrapper may run per batch.
        unwrapped = getattr(forward_model, "module", forward_model) if isinstance(
            forward_model, nn.parallel.DistributedDataParallel) else forward_model  # fmt: skip
        if unwrapped is forward_model:
            self.eval_model = self.forward_model
        else:
            self.eval_model = torch.compile(unwrapped) if cfg.compile else unwrapped
        self.optimizer, self.schedulers = optimizer, schedulers
        self.loaders, self.loggers, self.checkpointer = loaders, loggers, checkpointer
        self.device = device
        self.checkpoint_extra = (
            checkpoint_extra  # config, class names, logger state: things the loop doesn't own
        )
        self.callbacks = dict(callbacks or {})
        self.monitor, self.mode = checkpointer.monitor, checkpointer.mode
        self.state = TrainState()
        self.stop_signal: int | None = None
        self.should_stop = False  # set by a callback (early stopping, pruning): stop after this epoch
        self.show_progress = bool(cfg.progress_bar) and show_progress
        self.nan_policy = str(cfg.nan_policy)
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss (nan_policy=skip)
        self.stop_reason: str | None = None  # why fit ended early: max_steps, max_time or callback
        self.max_steps, self.max_time = cfg.get("max_steps"), parse_duration(cfg.get("max_time"))
        self.fit_start = self.epoch_start = 0.0
        self.val_metrics: dict[str, float] = {}  # of the latest validation
        self.validated_step = -1  # global step of the latest validation
        # Running sums of the epoch in progress and of the logging window; saved in mid-epoch checkpoints so a
        # resumed epoch reports the same train metrics as an uninterrupted one.
        self.train_metrics = Metrics(task, device, window=True)
        self.eval_metrics = Metrics(task, device)
        self.resumed_metrics: dict[str, Any] | None = None
        self.reduce = reduce  # sums a tensor over the DDP ranks (None: one process)
        self.mix = mix  # MixUp/CutMix of each training batch (`mix=...`): class indices become soft targets

        precision = str(cfg.precision)
        self.autocast_dtype = {
            "bf16": torch.bfloat16,
            "bf16-mixed": torch.bfloat16,
            "16-mixed": torch.float16,
        }.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
        self.channels_last = bool(cfg.channels_last)

    # ---------------------------------------------------------------- helpers
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def callback(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks.values():
            method = getattr(cb, hook, None)
            if method is not None:
                method(self, *args)

    def learning_rates(self) -> dict[str, float]:
        groups = self.optimizer.param_groups
        if len(groups) == 1:
            return {"lr": groups[0]["lr"]}
        return {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(groups)}

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a checkpoint holds; refused (TrainingDiverged) when the weights are not finite."""
        from lab.runtime import rng_state

        self.check_weights_finite()
        return {
            **self.checkpointer.model_state(self.model),  # "model", "frozen": lean for a frozen backbone
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedulers.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.state.epoch,
            "global_step": self.state.global_step,
            "batch_in_epoch": self.state.batch_in_epoch,
            "monitor": {"name": self.monitor, "mode": self.mode, "best": self.state.best},
            "callbacks": {
                name: cb.state_dict() for name, cb in self.callbacks.items() if hasattr(cb, "state_dict")
            },
            "train_metrics": self.train_metrics.state_dict() if self.state.batch_in_epoch else None,
            "rng": rng_state(),
            **self.checkpoint_extra(),
        }

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Everything needed to continue exactly where `state` was saved (model weights are loaded before)."""
        from lab.runtime import set_rng_state

        self.optimizer.load_state_dict(state["optimizer"])
        self.schedulers.load_state_dict(state.get("scheduler") or {})
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(
            epoch=state["epoch"],
            global_step=state["global_step"],
            batch_in_epoch=state.get("batch_in_epoch", 0),
            best=state.get("monitor", {}).get("best"),
        )
        for name, cb_state in (state.get("callbacks") or {}).items():
            if name in self.callbacks and hasattr(self.callbacks[name], "load_state_dict"):
                self.callbacks[name].load_state_dict(cb_state)
        self.checkpointer.load_state_dict(state.get("checkpointer", {}))
        if self.state.batch_in_epoch:
            self.resumed_metrics = state.get("train_metrics")
        if "rng" in state:
            set_rng_state(state["rng"])

    # ---------------------------------------------------------------- signals
    @contextlib.contextmanager
    def stop_signals(self):
        """First SIGINT/SIGTERM (or `trainer.stop_signals`): finish the step, save, exit. Second: exit at once."""
        names = list(self.cfg.get("stop_signals") or ["SIGINT", "SIGTERM"])
        signums = [getattr(signal, name) for name in names if hasattr(signal, name)]

        def handler(signum: int, frame: Any) -> None:
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            log.warning(
                "%s received: stopping after this step (again to quit now)", signal.Signals(signum).name
            )

        try:
            previous = {s: signal.signal(s, handler) for s in signums}
        except ValueError:  # not the main thread (e.g. some launchers): no signal handling
            previous = {}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # ---------------------------------------------------------------- fit
    def fit(self) -> dict[str, float]:
        """Epochs until `max_epochs`, `max_steps` or `max_time`, or until a callback asks to stop.

        Validation (best/last checkpoints, callbacks) runs at the end of every `check_val_every_n_epoch`-th epoch
        and, with `val_check_interval`, also within it. A `max_steps` reached mid-epoch is validated; a `max_time`
        that runs out only writes `last.pt` (mid-epoch), so the run resumes from there exactly.
        """
        cfg, state = self.cfg, self.state
        train_loader = self.loaders["train"]
        num_batches = limit_batches(cfg.limit_train_batches, len(train_loader))
        self.fit_start = time.monotonic()
        self.callback("on_fit_start")
        with self.stop_signals():
            while state.epoch < cfg.max_epochs and not self.budget_spent():
                self.epoch_start = time.perf_counter()
                self.callback("on_train_epoch_start")
                train_metrics = self.train_epoch(train_loader, num_batches)
                if self.stop_signal is not None:
                    self.save_interrupted()
                if state.batch_in_epoch < num_batches:  # stopped mid-epoch: max_steps, max_time or a callback
                    if self.stop_reason == "max_steps" and self.validated_step != state.global_step:
                        self.validate(train_metrics, epoch_end=False)
                    elif self.stop_reason == "max_time" and self.checkpointer.save_last:
                        self.checkpointer.save_step(self.checkpoint_state())
                    self.stop_reason = self.stop_reason or "callback"
                    break
                state.epoch += 1
                state.batch_in_epoch = 0
                if self.validation_due(state.epoch):
                    self.validate(train_metrics, epoch_end=True)
                else:  # no validation this epoch: last.pt and the epoch-wise scheduler all the same
                    self.schedulers.step_after_epoch(train_metrics)
                    self.loggers.log_metrics(self.epoch_record(train_metrics), state.global_step)
                    if self.checkpointer.enabled:
                        self.checkpointer.save_epoch(self.checkpoint_state(), state.epoch, None, False)
                if self.stop_signal is not None:  # arrived during validation: the epoch is complete
                    self.save_interrupted()
                if self.should_stop:  # asked by a callback: a normal end, checkpoints written
                    self.stop_reason = self.stop_reason or "callback"
                    break
        self.checkpointer.wait()  # the last checkpoint is on disk before anything reads it
        self.callback("on_fit_end")
        return self.val_metrics

    def validation_due(self, epoch: int) -> bool:
        """Whether epoch `epoch` (1-based) ends with a validation: every `check_val_every_n_epoch`-th, and the last."""
        return epoch % self.cfg.check_val_every_n_epoch == 0 or epoch == self.cfg.max_epochs

    def validation_steps(self, num_batches: int) -> int | None:
        """`val_check_interval` as optimizer steps: an int is that many steps, a float that fraction of an epoch."""
        interval = self.cfg.val_check_interval
        if interval is None:
            return None
        if isinstance(interval, float):
            steps_per_epoch = -(-num_batches // self.cfg.accumulate_grad_batches)
            return max(1, int(steps_per_epoch * interval))
        return int(interval)

    def budget_spent(self) -> bool:
        """`max_steps` taken or `max_time` (seconds of this process's fit) used up; sets `stop_reason`."""
        if self.max_steps is not None and self.state.global_step >= self.max_steps:
            self.stop_reason = "max_steps"
        elif self.max_time is not None and time.monotonic() - self.fit_start >= self.max_time:
            self.stop_reason = "max_time"
        else:
            return False
        return True

    def epoch_record(self, train_metrics: dict[str, float]) -> dict[str, float]:
        """What is logged when an epoch ends: its train metrics (`train/acc`, ...; `train/loss` is logged every
        `log_every_n_steps` over the steps since the last log), the epoch and its wall time."""
        record = {name: value for name, value in train_metrics.items() if name != "train/loss"}
        return {**record, "epoch": self.state.epoch, "epoch_time": time.perf_counter() - self.epoch_start}

    def validate(self, train_metrics: dict[str, float], epoch_end: bool) -> None:
        """Evaluate the val split, keep the best, log, run the callbacks and write the checkpoints."""
        state = self.state
        self.validated_step = state.global_step
        self.val_metrics = val_metrics = self.evaluate("val", self.cfg.limit_val_batches)
        self.callback("on_validation", val_metrics)
        epoch_metrics = {**train_metrics, **val_metrics}
        value = epoch_metrics.get(self.monitor)
        is_best = value is not None and ckpt.improved(value, state.best, self.mode)
        if is_best:
            state.best = value
        if epoch_end:
            self.schedulers.step_after_epoch(epoch_metrics)
            extra = self.epoch_record(train_metrics)
            where = f"epoch {state.epoch}/{self.cfg.max_epochs}"
        else:
            extra = {"epoch": state.epoch}
            where = f"step {state.global_step} (epoch {state.epoch + 1}, batch {state.batch_in_epoch})"
        self.loggers.log_metrics({**val_metrics, **extra}, state.global_step)
        log.info("%s  %s", where, "  ".join(f"{k}={v:.4f}" for k, v in epoch_metrics.items()))
        self.callback("on_validation_end", epoch_metrics)
        if self.checkpointer.enabled:
            self.checkpointer.save_epoch(self.checkpoint_state(), state.epoch, value, is_best)

    def train_epoch(self, loader: Any, num_batches: int) -> dict[str, float]:
        cfg, state = self.cfg, self.state
        model, task, optimizer, scaler = self.forward_model, self.task, self.optimizer, self.scaler
        # Plain Python values: an OmegaConf attribute lookup per step costs more than the metric update.
        accumulate, log_every = cfg.accumulate_grad_batches, cfg.log_every_n_steps
        clip = cfg.gradient_clip_val
        model.train()
        loader.set_epoch(state.epoch)
        metrics = self.train_metrics
        metrics.reset()
        if self.resumed_metrics is not None:  # mid-epoch resume: the sums of the batches already done
            metrics.load_state_dict(self.resumed_metrics)
            self.resumed_metrics = None
        skip_nan = self.nan_policy == "skip"
        val_every = self.validation_steps(num_batches) if self.validation_due(state.epoch + 1) else None
        budgets = self.max_steps is not None or self.max_time is not None
        step_hooks = [
            cb.on_optimizer_step for cb in self.callbacks.values() if hasattr(cb, "on_optimizer_step")
        ]
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # any bad loss since the last step
        window_start = time.perf_counter()
        start = state.batch_in_epoch  # > 0 only when resuming mid-epoch
        # An augmenting loader skips without augmenting (no RNG draws): a resumed epoch continues exactly.
        if isinstance(loader, AugmentedLoader):
            batches = loader.batches(start, num_batches)
        else:
            batches = islice(loader, start, num_batches)
        progress = self.progress(batches, total=num_batches, initial=start, desc=f"epoch {state.epoch + 1}")
        mix = self.mix
        for index, (x, y) in enumerate(progress, start=start):
            if mix is not None:
                x, y = mix(x, y)
            with self.autocast():
                outputs, y = task.adapt(model(self.prepare(x)), y)
                loss = task.loss(outputs, y)
            scaled = loss / accumulate if accumulate > 1 else loss
            (scaler.scale(scaled) if scaler else scaled).backward()
            if skip_nan:
                finite = torch.isfinite(loss.detach())
                nonfinite |= ~finite
                # Keep a skipped batch out of the metrics without a host sync: its loss counts as 0.
                loss = torch.where(finite, loss.detach(), torch.zeros_like(loss))
            metrics.update(loss, outputs, y)
            state.batch_in_epoch = index + 1
            if state.batch_in_epoch % accumulate and state.batch_in_epoch != num_batches:
                continue  # accumulate gradients over more batches

            log_now = (state.global_step + 1) % log_every == 0
            self.callback("on_after_backward")
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = None
            if clip:
                grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            elif log_now:
                grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), math.inf)
            if skip_nan and bool(nonfinite):  # one host sync per optimizer step, only with nan_policy=skip
                self.skipped_steps += 1
                log.warning("non-finite loss at step %d: optimizer step skipped (%d so far)",
                            state.global_step + 1, self.skipped_steps)  # fmt: skip
                nonfinite.zero_()
            elif scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            for hook in step_hooks:
                hook(self)
            lrs = self.learning_rates() if log_now else None  # the lr this step used
            self.schedulers.step_after_optimizer(state.global_step)

            if log_now:
                metrics.fold_losses()
                samples = metrics.window.count
                values = metrics.compute_window("train", self.reduce)
                self.check_finite(values["train/loss"])
                elapsed = time.perf_counter() - window_start
                values["train/samples_per_sec"] = samples / max(elapsed, 1e-9)
                if grad_norm is not None:
                    values["train/grad_norm"] = float(grad_norm)
                self.loggers.log_metrics({**values, **lrs}, state.global_step)
                if hasattr(progress, "set_postfix"):
                    progress.set_postfix(  # shown at tqdm's next redraw (at most every 0.1 s), not redrawn now
                        loss=f"{values['train/loss']:.4f}",
                        samples_s=f"{values['train/samples_per_sec']:.0f}",
                        refresh=False,
                    )
                window_start = time.perf_counter()
            if self.checkpointer.step_due(state.global_step):
                self.checkpointer.save_step(self.checkpoint_state())
            if self.stop_signal is not None:
                break
            epoch_step = -(-state.batch_in_epoch // accumulate)
            if val_every and epoch_step % val_every == 0 and state.batch_in_epoch < num_batches:
                self.validate(metrics.compute("train", self.reduce), epoch_end=False)
                if self.stop_signal is not None or self.should_stop:
                    break
            if budgets and self.budget_spent():
                break
        values = metrics.compute("train", self.reduce)
        self.check_finite(values["train/loss"])
        return values

    def check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss} at step {self.state.global_step}: lower optimizer.lr, set "
                "trainer.gradient_clip_val, or check the data; the last good checkpoint was kept"
            )

    def check_weights_finite(self) -> None:
        """Part of every `checkpoint_state()` (one sync each), so a diverged state never reaches the disk."""
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]  # + BatchNorm stats
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            raise TrainingDiverged(
                f"the weights hold NaN/Inf at step {self.state.global_step}: lower optimizer.lr, set "
                "trainer.gradient_clip_val, or check the data; the last good checkpoint was kept"
            )

    def save_interrupted(self) -> None:
        if self.checkpointer.save_last:
            self.checkpointer.save_step(self.checkpoint_state())
            self.checkpointer.wait()
            log.warning("saved %s (epoch %d, batch %d)", self.checkpointer.last_path, self.state.epoch,
                        self.state.batch_in_epoch)  # fmt: skip
        raise TrainingInterrupted(self.stop_signal)

    def progress(self, iterable: Iterable, total: int, initial: int = 0, desc: str = "") -> Iterable:
        if not self.show_progress:
            return iterable
        from lab.progress import progress

        return progress(iterable, total, initial, desc)  # tqdm on a terminal, else a log line every 30 s

    # ---------------------------------------------------------------- evaluate
    @torch.inference_mode()
    def outputs(
        self, stage: str, limit: int | float | None = None, progress: bool = False
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(outputs, loss, targets) of each batch of a split in eval mode, up to `limit` batches."""
        loader, model = self.loaders[stage], self.eval_model
        num_batches = limit_batches(limit, len(loader))
        batches = islice(loader, num_batches)
        if progress:
            batches = self.progress(batches, total=num_batches, desc=stage)
        was_training = model.training
        model.eval()
        try:
            for x, y in batches:
                with self.autocast():
                    outputs, y = self.task.adapt(model(self.prepare(x)), y)
                    loss = self.task.loss(outputs, y)
                yield outputs, loss, y
        finally:
            model.train(was_training)

    @torch.inference_mode()
    def evaluate(self, stage: str, limit: int | float | None = None) -> dict[str, float]:
        metrics = self.eval_metrics
        metrics.reset()
        for outputs, loss, y in self.outputs(stage, limit, progress=True):
            metrics.update(loss, outputs, y)
        return metrics.compute(stage, self.reduce)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)
