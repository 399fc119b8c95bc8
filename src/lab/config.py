"""Checks on the composed config that Hydra cannot do itself (plain YAML has no types or ranges).

Every check raises `UserError` naming the key and the allowed values, before anything is built or written.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lab.errors import UserError

PRECISIONS = ("32", "bf16", "bf16-mixed", "16-mixed")
MODES = ("min", "max")
NAN_POLICIES = ("stop", "skip")
# Metrics the loop produces each epoch, i.e. what `checkpoint.monitor` may watch.
MONITORABLE = ("val/acc", "val/loss", "train/acc", "train/loss")


def get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def positive_int(cfg: DictConfig, key: str, allow_zero: bool = False) -> int:
    value = get(cfg, key)
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(f"must be an integer {bound}, got {value!r}", key, f"set {key}=<integer {bound}>")
    return value


def positive_number(cfg: DictConfig, key: str) -> float:
    value = get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(
            f"must be a number > 0, got {value!r}", key, f"set {key}=<number > 0>, e.g. {key}=1e-3"
        )
    return float(value)


def fraction(cfg: DictConfig, key: str) -> float:
    value = get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise UserError(f"must be a number in (0, 1), got {value!r}", key, f"set e.g. {key}=0.1")
    return float(value)


def choice(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> str:
    value = str(get(cfg, key))
    if value not in allowed:
        raise UserError(f"unknown value {value!r}", key, f"use one of {', '.join(allowed)}")
    return value


def batch_limit(cfg: DictConfig, key: str) -> None:
    """`limit_*_batches`: null (all), an int > 0 (that many batches) or a float in (0, 1] (that fraction)."""
    value = get(cfg, key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"must be null, an integer > 0 or a fraction in (0, 1], got {value!r}", key)
    if (isinstance(value, int) and value <= 0) or (isinstance(value, float) and not 0 < value <= 1):
        raise UserError(f"must be null, an integer > 0 or a fraction in (0, 1], got {value!r}", key)


def validate(cfg: DictConfig) -> None:
    """Fail fast on values that would otherwise crash (or silently misbehave) minutes into training."""
    positive_int(cfg, "dataset.batch_size")
    if get(cfg, "dataset.num_workers") is not None:  # null: from the CPU count
        positive_int(cfg, "dataset.num_workers", allow_zero=True)
    fraction(cfg, "dataset.val_fraction")
    if get(cfg, "dataset.test_fraction") is not None:
        fraction(cfg, "dataset.test_fraction")
    positive_number(cfg, "optimizer.lr")
    positive_int(cfg, "trainer.max_epochs")
    positive_int(cfg, "trainer.log_every_n_steps")
    positive_int(cfg, "trainer.accumulate_grad_batches")
    if get(cfg, "trainer.seed") is not None:
        positive_int(cfg, "trainer.seed", allow_zero=True)
    if get(cfg, "trainer.gradient_clip_val") is not None:
        positive_number(cfg, "trainer.gradient_clip_val")
    if get(cfg, "trainer.early_stopping.patience") is not None:
        positive_int(cfg, "trainer.early_stopping.patience")
    for key in ("trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.limit_test_batches"):
        batch_limit(cfg, key)
    choice(cfg, "trainer.precision", PRECISIONS)
    choice(cfg, "trainer.nan_policy", NAN_POLICIES)
    signals = get(cfg, "trainer.stop_signals") or []
    unknown = [name for name in signals if not str(name).startswith("SIG") or not hasattr(signal, str(name))]
    if unknown:
        raise UserError(
            f"unknown signal {unknown[0]!r}", "trainer.stop_signals", "use e.g. [SIGINT,SIGTERM,SIGUSR1]"
        )
    choice(cfg, "checkpoint.mode", MODES)
    choice(cfg, "checkpoint.monitor", MONITORABLE)
    for key in ("checkpoint.save_top_k", "checkpoint.every_n_epochs"):
        positive_int(cfg, key, allow_zero=True)
    if get(cfg, "checkpoint.every_n_steps") is not None:
        positive_int(cfg, "checkpoint.every_n_steps")
    ckpt_path = get(cfg, "ckpt_path")
    if ckpt_path is not None and not Path(str(ckpt_path)).is_file():
        from lab.checkpoint import load

        load(ckpt_path)  # raises the UserError that says what is wrong with the path
    if not get(cfg, "train") and not get(cfg, "test"):
        raise UserError("nothing to do", "train=false test=false", "set train=true and/or test=true")
    if not get(cfg, "train") and ckpt_path is None:
        raise UserError(
            "evaluation needs a checkpoint", "ckpt_path", "set ckpt_path=<path to best.pt or last.pt>"
        )
