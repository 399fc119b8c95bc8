"""Trainer callbacks, built from `conf/callbacks/*.yaml`: each file holds `<name>: {_target_: ..., ...}`.

A callback subclasses `lab.Callback` (`lab.callbacks.base`: every hook, and the part of the trainer a callback
may use). Yours is one class and one YAML file: `python train.py callbacks=[default,yours]`, or
`+callbacks.<name>={_target_: ...}` for a one-off. `callbacks.<name>=null` switches one off.
"""

from __future__ import annotations

from omegaconf import DictConfig

from lab.callbacks.base import HOOKS, Callback, check_callback

__all__ = ["HOOKS", "Callback", "build_callbacks"]


def build_callbacks(cfg: DictConfig | None) -> dict[str, Callback]:
    """Every callback of `cfg` (name → object), in config order; null entries are off. Each must be a
    `Callback` whose `on_...` methods are all hooks."""
    from lab.config import build

    callbacks = {
        name: build(node, f"callbacks.{name}") for name, node in (cfg or {}).items() if node is not None
    }
    for name, callback in callbacks.items():
        check_callback(callback, name)
    return callbacks
