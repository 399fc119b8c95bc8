"""The Optuna sweeper of hydra-optuna-sweeper, made resumable. Selected by `conf/sweep/optuna.yaml`.

Hydra only instantiates sweepers that live in the `hydra_plugins` namespace package, hence this module's place.
Upstream, every run of the sweeper numbers its jobs from 0 and runs `n_trials` more trials, so re-running an
interrupted study in its sweep dir would write new trials into the old trials' job dirs. Here:
- job N is Optuna trial N, so a resumed study adds job dirs after the existing ones;
- `n_trials` is the number of finished (complete or failed) trials the study should hold, so re-running an
  interrupted study finishes it and re-running a finished one does nothing;
- trials left RUNNING by an interrupted sweep are marked FAIL (their job dirs show as incomplete);
- the sampler is reseeded on resume: with its configured seed it would propose the study's first trials again;
- a job that returns NaN (lab.train: failed or diverged) becomes a FAIL trial and the sweep goes on; upstream
  tells Optuna the NaN, whose rejection then escapes as a ValueError and stops the whole sweep;
- a SQLite storage's folder is created first (SQLite does not create folders);
- a study whose trials all failed ends with a warning instead of Optuna's "no trials are completed" error, so the
  sweep summary is still written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

# Hydra imports every hydra_plugins module at start: without the `sweep` extra, stay quiet and register nothing.
try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:
    OptunaSweeper = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(OptunaSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.sweeper.launcher = NanAsFailure(self.sweeper.launcher)

    def sweep(self, arguments: list[str]) -> Any:
        impl = self.sweeper  # upstream OptunaSweeperImpl
        if isinstance(impl.storage, str) and impl.storage.startswith("sqlite:///"):
            Path(impl.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        study = self._existing_study()
        if study is not None:
            self._resume(study)
        try:
            return super().sweep(arguments)
        except ValueError:
            study = self._existing_study()
            if study is None or any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
                raise
            log.warning("no trial of study %r completed (see the sweep summary)", impl.study_name)
            return None

    def _existing_study(self) -> Any:
        """The study in the storage, or None (new study, in-memory storage or no study name)."""
        import optuna

        impl = self.sweeper
        if impl.storage is None or impl.study_name is None:
            return None
        try:
            return optuna.load_study(study_name=impl.study_name, storage=impl.storage)
        except KeyError:
            return None

    def _resume(self, study: Any) -> None:
        from optuna.trial import TrialState

        impl = self.sweeper
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.warning("trial %d was left running by an interrupted sweep: marking it failed", trial.number)
            study.tell(trial.number, state=TrialState.FAIL)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state.is_finished() for t in trials)
        impl.job_idx = len(trials)  # the next trial's number
        if hasattr(impl.sampler, "reseed_rng"):  # a seeded sampler would repeat the study's first trials
            impl.sampler.reseed_rng()
        impl.n_trials = max(0, impl.n_trials - finished)
        log.info("resuming study %r: %d finished trials, %d to go", impl.study_name, finished, impl.n_trials)


class NanAsFailure:
    """Wraps the configured launcher: a NaN return becomes None, which the upstream sweeper records as FAIL.

    Not a `Launcher` subclass, so that Hydra's plugin scan does not list it as a launcher of its own.
    """

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        returns = self.launcher.launch(job_overrides, initial_job_idx)
        for num, ret in enumerate(returns, initial_job_idx):
            value = ret.return_value if ret.status == JobStatus.COMPLETED else None
            if isinstance(value, float) and math.isnan(value):
                log.warning("trial %d failed: the job returned NaN (see its metrics.json and train.log)", num)
                ret.return_value = None
        return returns
