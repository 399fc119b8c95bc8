"""Hydra callbacks (listed in `conf/hydra/default.yaml`) for things that must happen before Hydra's own job set-up."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lab.errors import UserError
from lab.runtime import check_writable


class CheckOutputDir(Callback):
    """Hydra creates the run dir before the task starts and prints a traceback when it cannot: check it first."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        try:
            check_writable(str(OmegaConf.select(config, key)), key)
        except UserError as e:
            e.exit()  # SystemExit passes through Hydra's error reporting: no traceback
