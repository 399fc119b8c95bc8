"""The training loop: fit, validate, test. Driven by a `TrainerConfig` (`conf/trainer/*.yaml` override its defaults).

It sees a model, a task (loss and metrics, `lab.tasks`), loaders, an optimizer, and optionally schedulers, a logger
fan-out, a checkpointer and callbacks; no loss, metric, dataset class or logging library is named here. Without
Hydra, in a notebook:

    trainer = Trainer(model, task, {"train": train_loader, "val": val_loader}, optimizer,
                      config=TrainerConfig(max_epochs=3, device="cpu"))
    trainer.fit()                       # or trainer.fit(ckpt_path="last.pt") to continue a run

A loader is anything that yields `(inputs, targets)` batches; lab's own offer `batches(start, stop)` and
`set_epoch(epoch)` and serve them on the training device; others (a `DataLoader`, a list) are adapted and their
batches moved there (`lab.data.loaders.as_loader`). Metrics accumulate on the device and
are read back once per logging interval, so the loop adds no host-device synchronisation per step.

One step of training is three parts, each a method: `micro_step` (forward and backward of one batch),
`optimizer_step` (unscale, clip, skip, step, schedulers; once per `accumulate_grad_batches` batches) and
`after_step` (logging, checkpoints, validation, budgets).

Callbacks (`conf/callbacks/*.yaml`) subclass `lab.Callback`: its module, `lab.callbacks.base`, lists every hook
and the part of the trainer a callback may use.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lab import checkpoint as ckpt
from lab.config import TrainerConfig, parse_duration
from lab.data.loaders import as_loader
from lab.metrics import Metrics
from lab.optim import Schedulers
from lab.runtime import quit_now
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


def steps_per_epoch(config: TrainerConfig, num_batches: int) -> int:
    """Optimizer steps of one epoch of `num_batches` training batches (a short last window is a step too)."""
    return -(-limit_batches(config.limit_train_batches, num_batches) // config.accumulate_grad_batches)


def optimizer_steps(config: TrainerConfig, num_batches: int) -> int:
    """The optimizer steps a whole run takes: `max_epochs` epochs, `limit_train_batches` and accumulation
    counted, cut by `max_steps` (what a per-step scheduler such as OneCycleLR must span)."""
    total = config.max_epochs * steps_per_epoch(config, num_batches)
    return min(total, config.max_steps) if config.max_steps is not None else total


def trainer_config(config: TrainerConfig | Mapping[str, Any] | None) -> TrainerConfig:
    """A `TrainerConfig` from itself, None (the defaults) or a mapping such as the composed `cfg.trainer`."""
    if config is None:
        return TrainerConfig()
    if isinstance(config, TrainerConfig):
        return config
    from omegaconf import DictConfig, OmegaConf

    values = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    known = {f.name for f in fields(TrainerConfig)}
    return TrainerConfig(**{k: v for k, v in values.items() if k in known})


class Network:
    """What runs: `model` is the plain module (what checkpoints hold); `module` is what batches go through (the
    model, or its head on cached features); `train_module` is that module wrapped in DistributedDataParallel
    and/or `torch.compile`, `eval_module` the same without the DDP wrapper (each rank evaluates its own shard,
    sizes may differ by one, and only metric sums are reduced, so no collective op of the wrapper may run per
    batch). Under fsdp (`fsdp`) the model itself is sharded (`lab.fsdp`): every forward gathers parameters from
    every rank, so all ranks run the same number of them, in training and in evaluation."""

    def __init__(
        self,
        model: nn.Module,
        module: nn.Module | None = None,
        distributed: Any = None,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.module = model if module is None else module
        enabled = distributed is not None and distributed.enabled
        wrapped = distributed.wrap(self.module) if enabled else self.module
        self.fsdp = bool(enabled and distributed.fsdp)
        self.ddp = wrapped if wrapped is not self.module else None
        self.train_module: nn.Module = torch.compile(wrapped) if compile else wrapped
        if self.ddp is None:
            self.eval_module = self.train_module
        else:
            self.eval_module = torch.compile(self.module) if compile else self.module

    def no_sync(self, accumulating: bool) -> contextlib.AbstractContextManager:
        """DDP's `no_sync()` (FSDP's the same) for a micro-batch that is not the last of its accumulation window:
        its gradients stay local and are reduced together with the last one's."""
        if accumulating and self.ddp is not None:
            return self.ddp.no_sync()
        if accumulating and self.fsdp:
            from lab.fsdp import no_gradient_sync

            return no_gradient_sync(self.module)
        return contextlib.nullcontext()


class Trainer:
    # Read-only views for callbacks (their whole surface is listed in `lab.callbacks.base`).
    def batch_limit(self, stage: str) -> int | float | None:
        """`trainer.limit_<stage>_batches`: None (all), a count or a fraction of the split's batches."""
        return getattr(self.cfg, f"limit_{stage}_batches")

    @property
    def train_batches(self) -> int:
        """Training batches per epoch, `limit_train_batches` applied."""
        return limit_batches(self.batch_limit("train"), len(self.loaders["train"]))

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        loaders: Mapping[str, Any],
        optimizer: torch.optim.Optimizer,
        config: TrainerConfig | Mapping[str, Any] | None = None,
        *,
        schedulers: Schedulers | None = None,
        loggers: Any = None,
        checkpointer: ckpt.Checkpointer | None = None,
        callbacks: Mapping[str, Any] | None = None,
        module: nn.Module | None = None,
        distributed: Any = None,
        device: torch.device | None = None,
        mix: Any = None,
        class_names: Sequence[str] = (),
        checkpoint_extra: Mapping[str, Any] | None = None,
        show_progress: bool = True,
    ) -> None:
        """`module`: what batches go through when it is not the whole `model` (a head on cached features);
        `distributed`: this process's place in a torchrun job (`lab.distributed.Distributed`), None for one
        process; `checkpoint_extra`: plain values every checkpoint also holds (config, class names, ...);
        `mix`: MixUp/CutMix of each training batch (class indices become soft targets); `device`: where the
        batches go, by default the model's (`config.device` and `config.seed` are for `lab.train`, which places the
        model and seeds the run before building the trainer)."""
        from lab.loggers import LoggerFanOut

        self.cfg = cfg = trainer_config(config)
        self.task = task
        self.class_names = list(class_names)  # for callbacks that name classes (the monitor's figures)
        self.distributed = distributed if distributed is not None and distributed.enabled else None
        self.network = Network(model, module, self.distributed, cfg.compile)
        self.model = model  # the plain module: its state_dict is what checkpoints hold
        self.optimizer = optimizer
        self.schedulers = schedulers if schedulers is not None else Schedulers()
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.device = device
        self.loaders = {stage: as_loader(loader, device) for stage, loader in loaders.items()}
        self.loggers = loggers if loggers is not None else LoggerFanOut({})
        self.checkpointer = checkpointer if checkpointer is not None else ckpt.Checkpointer(
            ".", "val/loss", "min", save_last=False, save_top_k=0)  # fmt: skip
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.callbacks = dict(callbacks or {})
        self.monitor, self.mode = self.checkpointer.monitor, self.checkpointer.mode
        self.state = TrainState()
        self.stop_signal: int | None = None
        self.should_stop = False  # set by a callback (early stopping, pruning): stop after this epoch
        self.show_progress = bool(cfg.progress_bar) and show_progress
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss (nan_policy=skip)
        self.stop_reason: str | None = None  # why fit ended early: max_steps, max_time or callback
        self.max_time = parse_duration(cfg.max_time)
        self.fit_start = self.epoch_start = 0.0
        self.val_metrics: dict[str, float] = {}  # of the latest validation
        self.validated_step = -1  # global step of the latest validation
        self.last_saved_step = -1  # global step of the newest last.pt written
        # Running sums of the epoch in progress and of the logging window; saved in mid-epoch checkpoints so a
        # resumed epoch reports the same train metrics as an uninterrupted one.
        self.train_metrics = Metrics(task, device, window=True)
        self.eval_metrics = Metrics(task, device)
        self.resumed_metrics: dict[str, Any] | None = None
        self.reduce = self.distributed.all_reduce_sum if self.distributed else None  # sum over the ranks
        self.world_size = self.distributed.world_size if self.distributed else 1
        # Buffers (BatchNorm statistics) are broadcast from rank 0 after every optimizer step, so that every rank
        # validates, averages (EMA) and saves the same model.
        self.synced_buffers = [b for b in self.network.module.buffers()] if self.distributed else []
        self.mix = mix

        precision = str(cfg.precision)
        self.autocast_dtype = {
            "bf16": torch.bfloat16,
            "bf16-mixed": torch.bfloat16,
            "16-mixed": torch.float16,
        }.get(precision)
        if self.network.fsdp:  # bf16 is FSDP's mixed-precision policy (lab.fsdp), not autocast
            self.autocast_dtype = None
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
        self.channels_last = bool(cfg.channels_last)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # any bad loss since the last step
        self.window_start = 0.0  # perf_counter at the start of the logging window
        self.val_steps: set[int] = set()  # the epoch's optimizer steps after which it validates

    # ---------------------------------------------------------------- helpers
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def callback(self, hook: str, *args: Any) -> None:
        """Call `hook` of every callback that overrides it (the table is checked and built once)."""
        for method in self.hooks(hook):
            method(self, *args)

    def hooks(self, hook: str) -> list[Callable[..., None]]:
        """The callbacks' methods for `hook`; rebuilt (and the callbacks checked) when `self.callbacks` changes."""
        from lab.callbacks.base import hook_table

        key = tuple(map(id, self.callbacks.values()))
        if getattr(self, "_hook_key", None) != key:
            self._hook_table, self._hook_key = hook_table(self.callbacks), key
        return self._hook_table[hook]

    @property
    def eval_model(self) -> nn.Module:
        """What evaluates batches (`network.eval_module`)."""
        return self.network.eval_module

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
            "loggers": self.loggers.state_dict(),
            **self.checkpoint_extra,
        }

    def save_last(self) -> None:
        """`last.pt` now (mid-epoch or at the end)."""
        self.checkpointer.save_step(self.checkpoint_state())
        self.last_saved_step = self.state.global_step

    def save_validated(self, value: float | None, is_best: bool) -> None:
        """The checkpoints of a validation (or of an epoch without one): last.pt every `every_n_epochs`, best.pt."""
        checkpointer = self.checkpointer
        checkpointer.save_epoch(self.checkpoint_state(), self.state.epoch, value, is_best)
        if (
            checkpointer.save_last
            and checkpointer.every_n_epochs
            and self.state.epoch % checkpointer.every_n_epochs == 0
        ):
            self.last_saved_step = self.state.global_step

    # ---------------------------------------------------------------- resume
    def resume(self, ckpt_path: str | Path, checkpoint: dict[str, Any] | None = None) -> None:
        """Continue from `ckpt_path`: the weights, then (for a training checkpoint) the optimizer, schedulers,
        scaler, loop state, callbacks' state, checkpointer's top-k, the loggers' runs and the RNG states.
        `checkpoint`: the file already read, its weights already in the model (`lab.train` restores them first,
        before a frozen backbone's features are cached). A checkpoint of weights alone starts at epoch 0."""
        if checkpoint is None:
            checkpoint = ckpt.load(ckpt_path)
            ckpt.restore_model(self.model, checkpoint, f"ckpt_path={ckpt_path}", self.checkpointer.strict)
        if not ckpt.is_resumable(checkpoint):
            log.info("ckpt_path=%s holds weights only: training starts from them at epoch 0", ckpt_path)
            return
        if self.network.fsdp:
            from lab.fsdp import check_resumable

            check_resumable(checkpoint, f"ckpt_path={ckpt_path}")
        self.load_checkpoint_state(checkpoint)
        self.loggers.resume(self.state.global_step, checkpoint.get("loggers") or {})
        planned = self.state.global_step + self.remaining_steps()
        spans = getattr(self.schedulers.main, "total_steps", None)
        if spans is not None and spans != planned:
            log.warning("scheduler.total_steps stays %d as the checkpoint's schedule; this run takes %d steps in all",
                        spans, planned)  # fmt: skip
        log.info("resumed from %s at epoch %d, step %d", ckpt_path, self.state.epoch, self.state.global_step)

    def remaining_steps(self) -> int:
        """Optimizer steps from the current state to the end of the run (`max_epochs`, cut by `max_steps`)."""
        per_epoch = steps_per_epoch(self.cfg, len(self.loaders["train"]))
        done_in_epoch = -(-self.state.batch_in_epoch // self.cfg.accumulate_grad_batches)
        remaining = (self.cfg.max_epochs - self.state.epoch) * per_epoch - done_in_epoch
        if self.cfg.max_steps is not None:
            remaining = min(remaining, self.cfg.max_steps - self.state.global_step)
        return max(remaining, 0)

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Everything needed to continue exactly where `state` was saved (model weights are loaded before)."""
        from lab.runtime import set_rng_state

        if "sharded" in state:  # an fsdp run's: model and optimizer from its folder, into this run's shards
            from lab.fsdp import load_sharded

            load_sharded(self.model, self.optimizer, state["sharded"])
        else:
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
        names = list(self.cfg.stop_signals or ["SIGINT", "SIGTERM"])
        signums = [getattr(signal, name) for name in names if hasattr(signal, name)]

        def handler(signum: int, frame: Any) -> None:
            if self.stop_signal is not None:
                quit_now(signum)
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
            for s, h in previous.items():  # after a stop signal, one more ends the process at once (quit_now)
                signal.signal(s, h if self.stop_signal is None else quit_now)

    # ---------------------------------------------------------------- fit
    def fit(self, ckpt_path: str | Path | None = None) -> dict[str, float]:
        """Epochs until `max_epochs`, `max_steps` or `max_time`, or until a callback asks to stop; with
        `ckpt_path`, continue from that checkpoint first (`resume`).

        Validation (best/last checkpoints, callbacks) runs at the end of every `check_val_every_n_epoch`-th epoch
        and, with `val_check_interval`, also within it. A `max_steps` reached mid-epoch is validated; a `max_time`
        that runs out only writes `last.pt` (mid-epoch), so the run resumes from there exactly. However training
        ends (but a stop signal or a divergence), `last.pt` then holds its final state.
        """
        if ckpt_path is not None:
            self.resume(ckpt_path)
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
                if self.stop_requested():
                    self.save_interrupted()
                if state.batch_in_epoch < num_batches:  # stopped mid-epoch: max_steps, max_time or a callback
                    if self.stop_reason == "max_steps" and self.validated_step != state.global_step:
                        self.validate(train_metrics, epoch_end=False)
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
                        self.save_validated(None, False)
                if self.stop_requested():  # arrived during validation: the epoch is complete
                    self.save_interrupted()
                if self.any_rank(self.should_stop):  # asked by a callback: a normal end, checkpoints written
                    self.stop_reason = self.stop_reason or "callback"
                    break
        if self.checkpointer.save_last and self.last_saved_step != state.global_step:
            self.save_last()  # the newest state, whatever every_n_epochs / every_n_steps said
        self.checkpointer.wait()  # the last checkpoint is on disk before anything reads it
        self.callback("on_fit_end")
        return self.val_metrics

    def validation_due(self, epoch: int) -> bool:
        """Whether epoch `epoch` (1-based) ends with a validation: every `check_val_every_n_epoch`-th, and the last."""
        return epoch % self.cfg.check_val_every_n_epoch == 0 or epoch == self.cfg.max_epochs

    def validation_steps(self, num_batches: int) -> set[int]:
        """The optimizer steps of an epoch (1-based, before its last) after which `val_check_interval` validates:
        an int N every N steps; a float f after each fraction f, 2f, ... of the epoch's steps (rounded up)."""
        interval = self.cfg.val_check_interval
        steps = -(-num_batches // self.cfg.accumulate_grad_batches)
        if interval is None:
            return set()
        if isinstance(interval, float):
            points = range(1, math.floor(1 / interval + 1e-9) + 1)
            due = {max(1, math.ceil(k * interval * steps - 1e-9)) for k in points}
        else:
            due = set(range(int(interval), steps + 1, int(interval)))
        return {step for step in due if step < steps}  # the epoch's end validates anyway

    def any_rank(self, flag: bool) -> bool:
        """`flag` on any rank (one small all-reduce under torchrun). A decision to stop must be the same on every
        rank: one that stopped alone would leave the others waiting in their next collective."""
        return flag if self.distributed is None else self.distributed.most(int(flag)) > 0

    def stop_requested(self) -> bool:
        """A stop signal has arrived, here or on another rank (a signal reaches the ranks at different steps)."""
        if self.distributed is not None:
            self.stop_signal = self.distributed.most(self.stop_signal or 0) or None
        return self.stop_signal is not None

    def budget_spent(self) -> bool:
        """`max_steps` taken or `max_time` (seconds of this process's fit) used up; sets `stop_reason`."""
        if self.cfg.max_steps is not None and self.state.global_step >= self.cfg.max_steps:
            self.stop_reason = "max_steps"
        elif self.max_time is not None and self.any_rank(time.monotonic() - self.fit_start >= self.max_time):
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
            self.save_validated(value, is_best)

    def train_epoch(self, loader: Any, num_batches: int) -> dict[str, float]:
        """One epoch (or its rest, when resumed mid-epoch): micro-steps, an optimizer step at the end of each
        accumulation window, then what follows a step. Returns the epoch's train metrics."""
        state, accumulate = self.state, self.cfg.accumulate_grad_batches
        self.network.train_module.train()
        loader.set_epoch(state.epoch)
        self.train_metrics.reset()
        if self.resumed_metrics is not None:  # mid-epoch resume: the sums of the batches already done
            self.train_metrics.load_state_dict(self.resumed_metrics)
            self.resumed_metrics = None
        self.val_steps = self.validation_steps(num_batches) if self.validation_due(state.epoch + 1) else set()
        # The last window of an epoch may hold fewer than `accumulate` batches: its losses are averaged over
        # the batches it holds, as a full window's are.
        last_window = (num_batches - 1) // accumulate * accumulate
        self.window_start = time.perf_counter()
        start = state.batch_in_epoch  # > 0 only when resuming mid-epoch
        # Skipped batches are not augmented (no RNG draws): a resumed epoch continues exactly.
        progress = self.progress(loader.batches(start, num_batches), total=num_batches, initial=start,
                                 desc=f"epoch {state.epoch + 1}")  # fmt: skip
        for index, (x, y) in enumerate(progress, start=start):
            window_end = (index + 1) % accumulate == 0 or index + 1 == num_batches
            size = accumulate if index < last_window else num_batches - last_window
            self.micro_step(x, y, size, sync=window_end)
            state.batch_in_epoch = index + 1
            if not window_end:
                continue  # accumulate gradients over more batches
            log_now = (state.global_step + 1) % self.cfg.log_every_n_steps == 0
            grad_norm, lrs = self.optimizer_step(log_now)
            if self.after_step(log_now, grad_norm, lrs, progress, num_batches):
                break
        values = self.train_metrics.compute("train", self.reduce)
        self.check_finite(values["train/loss"])
        return values

    def micro_step(self, x: Tensor, y: Tensor, window: int, sync: bool) -> None:
        """Forward and backward of one batch; its loss counts 1/`window` of the step's gradient. Without `sync`
        (not the last batch of its window) DDP keeps the gradients local."""
        if self.mix is not None:
            x, y = self.mix(x, y)
        with self.network.no_sync(not sync):
            with self.autocast():
                outputs, y = self.task.adapt(self.network.train_module(self.prepare(x)), y)
                loss = self.task.loss(outputs, y)
            scaled = loss / window if window > 1 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if self.cfg.nan_policy == "skip":
            finite = torch.isfinite(loss.detach())
            self.nonfinite |= ~finite
            # Keep a skipped batch out of the metrics without a host sync: its loss counts as 0.
            loss = torch.where(finite, loss.detach(), torch.zeros_like(loss))
        self.train_metrics.update(loss, outputs, y)

    def optimizer_step(self, log_now: bool) -> tuple[Tensor | None, dict[str, float] | None]:
        """Unscale, clip, skip (nan_policy=skip) or step, then the schedulers. Returns the gradient norm (when
        clipping or logging) and the learning rates this step used (when logging)."""
        optimizer, scaler, state = self.optimizer, self.scaler, self.state
        self.callback("on_after_backward")
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = None
        if self.cfg.gradient_clip_val:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.gradient_clip_val)
        elif log_now:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), math.inf)
        if hasattr(grad_norm, "full_tensor"):  # fsdp: a DTensor, the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        if self.cfg.nan_policy == "skip" and self.step_is_bad():
            self.skipped_steps += 1
            log.warning("non-finite loss at step %d: optimizer step skipped (%d so far)",
                        state.global_step + 1, self.skipped_steps)  # fmt: skip
        elif scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        if self.synced_buffers:
            self.distributed.broadcast(self.synced_buffers)
        self.callback("on_optimizer_step")
        lrs = self.learning_rates() if log_now else None  # the lr this step used
        self.schedulers.step_after_optimizer(state.global_step)
        return grad_norm, lrs

    def step_is_bad(self) -> bool:
        """Whether any batch of this window, on any rank, had a non-finite loss: one host sync (and under DDP one
        all-reduce) per optimizer step, only with nan_policy=skip, so that every rank skips the same steps."""
        bad = bool(self.nonfinite if self.reduce is None else self.reduce(self.nonfinite.float()) > 0)
        self.nonfinite.zero_()
        return bad

    def after_step(self, log_now: bool, grad_norm: Tensor | None, lrs: dict[str, float] | None, progress: Any,
                   num_batches: int) -> bool:  # fmt: skip
        """Logging, checkpoints, validation within the epoch, budgets. True: end the epoch here."""
        state = self.state
        if log_now:
            self.log_window(grad_norm, lrs, progress)
        epoch_step = -(-state.batch_in_epoch // self.cfg.accumulate_grad_batches)
        validate = epoch_step in self.val_steps and state.batch_in_epoch < num_batches
        # A step's validation comes before its checkpoint, a stop signal's too: a run resumed from that checkpoint
        # continues after it, so it must not be skipped.
        if validate:
            self.validate(self.train_metrics.compute("train", self.reduce), epoch_end=False)
        if self.checkpointer.step_due(state.global_step):
            self.save_last()
        if self.stop_requested() or (validate and self.any_rank(self.should_stop)):
            return True
        return self.budget_spent()  # max_time mid-epoch: fit writes last.pt, resumable from exactly here

    def log_window(self, grad_norm: Tensor | None, lrs: dict[str, float] | None, progress: Any) -> None:
        """The logging window's train loss, throughput (samples of all ranks per second), gradient norm and lr."""
        metrics = self.train_metrics
        metrics.fold_losses()
        samples = metrics.window.count * self.world_size  # every rank trains on equal shards
        values = metrics.compute_window("train", self.reduce)
        self.check_finite(values["train/loss"])
        elapsed = time.perf_counter() - self.window_start
        values["train/samples_per_sec"] = samples / max(elapsed, 1e-9)
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        self.loggers.log_metrics({**values, **(lrs or {})}, self.state.global_step)
        if hasattr(progress, "set_postfix"):
            progress.set_postfix(  # shown at tqdm's next redraw (at most every 0.1 s), not redrawn now
                loss=f"{values['train/loss']:.4f}",
                samples_s=f"{values['train/samples_per_sec']:.0f}",
                refresh=False,
            )
        self.window_start = time.perf_counter()

    def check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss} at step {self.state.global_step}: lower optimizer.lr, set "
                "trainer.gradient_clip_val, or check the data; the last good checkpoint was kept"
            )

    def check_weights_finite(self) -> None:
        """Part of every `checkpoint_state()` (one sync each), so a diverged state never reaches the disk."""
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]  # + BatchNorm stats
        tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # fsdp: this rank's shards
        finite = (
            torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else torch.tensor(True)
        )
        if self.network.fsdp:  # every rank checks its shards: all stop, or none
            finite = self.reduce((~finite).float().to(self.device)) == 0
        if not bool(finite):
            raise TrainingDiverged(
                f"the weights hold NaN/Inf at step {self.state.global_step}: lower optimizer.lr, set "
                "trainer.gradient_clip_val, or check the data; the last good checkpoint was kept"
            )

    def save_interrupted(self) -> None:
        if self.checkpointer.save_last:
            self.save_last()
            self.checkpointer.wait()
            if self.checkpointer.write:  # rank 0 (the others took part, under fsdp, and wrote their shards)
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
        loader, model = self.loaders[stage], self.network.eval_module
        num_batches = limit_batches(limit, len(loader))
        # fsdp: a rank with fewer batches (shards may differ by a sample) runs as many forwards as the others.
        padding = self.distributed.most(num_batches) - num_batches if self.network.fsdp else 0
        batches = loader.batches(0, num_batches)
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
            for _ in range(padding):  # outputs left out
                model(self.task.example_input(self.device))
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
