"""Hydra callbacks (listed in `conf/hydra/default.yaml`) for things that must happen before Hydra's own job set-up."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lab.errors import EXIT_USER_ERROR, UserError


def check_writable(directory: str | Path, key: str) -> None:
    """Create `directory` and a probe file in it; any OSError becomes one clear line."""
    directory = Path(directory)
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"output directory is not writable: {directory} ({e.strerror or type(e).__name__})",
            key,
            "choose a writable place with hydra.run.dir=... or paths.log_dir=...",
        ) from None


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
            print(e.line(), file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)  # SystemExit passes through Hydra's error reporting: no traceback
