"""Hydra callbacks (listed in `conf/hydra/default.yaml`) for things that must happen before Hydra's own job set-up."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lab.errors import UserError
from lab.runtime import check_writable, code_version


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


class RecordCode(Callback):
    """`<sweep dir>/code/`: the commit (`commit.txt`), the uncommitted changes to tracked files (`diff.patch`) and
    a copy of `conf/` that a sweep started from, so that editing the code while it runs is seen (the summary flags
    jobs whose own `run_info.json` names other code). A sweep resumed in the same folder keeps the first record."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        code = Path(str(config.hydra.sweep.dir)) / "code"
        if code.exists():
            return
        commit, diff = code_version()
        code.mkdir(parents=True)
        (code / "commit.txt").write_text(f"{commit or 'unknown (not a git checkout)'}\n")
        (code / "diff.patch").write_text(f"{diff}\n" if diff else "")
        sources = config.hydra.runtime.config_sources
        main = next((s.path for s in sources if s.provider == "main" and s.schema == "file"), None)
        if main:
            shutil.copytree(main, code / "conf")
