"""hydra-submitit-launcher's launchers with requeues that resume: `hydra/launcher=slurm` selects `SlurmLauncher`.

SLURM sends its signal (SIGUSR2, `signal_delay_s` before the time limit, or on preemption) to a running job;
submitit's handler calls the launcher's `checkpoint()`, which submits the same job again, and requeues it. Left
like that, the job would lose everything since its last checkpoint. Here each job's task adds that signal to
`trainer.stop_signals`: lab finishes the step, writes `last.pt` and stops; only then is submitit's handler called,
which requeues the job (up to `max_num_timeout` times after a time limit, always after a preemption). The requeued
job runs in the same job dir, and a sweep job continues from its own `checkpoints/last.pt` (lab.train.resolve_resume).
"""

from __future__ import annotations

import signal
from typing import Any

from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import DictConfig, open_dict


class StopThenRequeue:
    """The job's task function, stopped by submitit's signal with `last.pt` written, then requeued by submitit."""

    def __init__(self, task_function: TaskFunction) -> None:
        self.task_function = task_function

    def __call__(self, cfg: DictConfig) -> Any:
        from submitit import JobEnvironment

        signum = JobEnvironment._usr_sig()  # SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
        requeue = signal.getsignal(signum)  # submitit's handler: checkpoint() and requeue
        name = signal.Signals(signum).name
        with open_dict(cfg):
            stop = list(cfg.trainer.get("stop_signals") or ["SIGINT", "SIGTERM"])
            cfg.trainer.stop_signals = stop if name in stop else [*stop, name]
        try:
            return self.task_function(cfg)
        except SystemExit as e:  # lab.train.main: a stop signal ends the job with 128 + its number
            if e.code == 128 + signum and callable(requeue):
                requeue(signum, None)  # requeues and exits; returns only when it does not requeue
            raise


class _Requeueing:
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(
            hydra_context=hydra_context, task_function=StopThenRequeue(task_function), config=config
        )


class SlurmLauncher(_Requeueing, submitit_launcher.SlurmLauncher):
    pass


class LocalLauncher(_Requeueing, submitit_launcher.LocalLauncher):
    """submitit's local executor (processes on this machine), which requeues like SLURM: for trying it out."""
