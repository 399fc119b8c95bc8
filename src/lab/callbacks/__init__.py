"""Trainer callbacks, built from `conf/callbacks/*.yaml`: each file holds `<name>: {_target_: ..., ...}`.

A callback is a plain object with any of the hook methods listed in `lab.trainer` (`on_fit_start`,
`on_validation_end`, ...). Yours is one class and one YAML file: `python train.py callbacks=[default,yours]`, or
`+callbacks.<name>={_target_: ...}` for a one-off. `callbacks.<name>=null` switches one off.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig


def build_callbacks(cfg: DictConfig | None) -> dict[str, Any]:
    """Every callback of `cfg` (name → object), in config order; null entries are off."""
    from lab.config import build

    if not cfg:
        return {}
    return {name: build(node, f"callbacks.{name}") for name, node in cfg.items() if node is not None}
