"""Hydra callbacks (listed in `conf/hydra/default.yaml`) for things that must happen before Hydra's own job set-up."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lab import run_lock
from lab.errors import UserError
from lab.redact import install_log_filter, scrub_file, scrub_text, secret_values
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
        # A secret in an edited tracked file (an override's or the environment's value) stays out of it.
        values = secret_values(None, _overrides(config))
        (code / "diff.patch").write_text(scrub_text(f"{diff}\n", values) if diff else "")
        sources = config.hydra.runtime.config_sources
        main = next((s.path for s in sources if s.provider == "main" and s.schema == "file"), None)
        if main:
            shutil.copytree(main, code / "conf")


class LockRunDir(Callback):
    """Takes the run folder's lock (lab.run_lock) before Hydra writes `.hydra/` and the log into it, so a second
    process on the same folder changes nothing there; the run releases it when it ends (lab.train.run)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            run_lock.acquire(str(OmegaConf.select(config, "hydra.run.dir")))
        except UserError as e:
            e.exit()
        except OSError:  # a folder that cannot be made: the run fails on it with its own one-line error
            return


class RedactSecrets(Callback):
    """Secret values out of Hydra's console lines (the sweep's `#0 : ...`), `multirun.yaml` and each job's
    `.hydra/`, which Hydra writes before the task runs (lab.redact)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        install_log_filter(None, _overrides(config))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        install_log_filter(None, _overrides(config))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        values = secret_values(_resolved(config), _overrides(config))
        install_log_filter(None, _overrides(config))
        output_dir = Path(str(config.hydra.runtime.output_dir))
        for path in sorted((output_dir / ".hydra").glob("*.yaml")):
            scrub_file(path, values)
        if config.hydra.mode == RunMode.MULTIRUN:
            scrub_file(Path(str(config.hydra.sweep.dir)) / "multirun.yaml", values)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        values = secret_values(None, _overrides(config))
        scrub_file(Path(str(config.hydra.sweep.dir)) / "multirun.yaml", values)


def _overrides(config: DictConfig) -> list[str]:
    return [*config.hydra.overrides.task, *config.hydra.overrides.hydra]


def _resolved(config: DictConfig) -> Any:
    """The job's config with interpolations resolved where they can be (`${oc.env:...}`), without Hydra's part."""
    task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    try:
        return OmegaConf.to_container(task, resolve=True)
    except Exception:  # a resolver that fails here fails again, with its own message, when the job builds
        return OmegaConf.to_container(task, resolve=False)
