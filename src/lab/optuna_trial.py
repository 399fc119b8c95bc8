"""A job of lab's Optuna sweeper (src/hydra_plugins/lab_optuna.py) and its trial: report, prune, say so.

The job finds its trial without any extra override: job N of the sweep is trial N, and the study's storage, name
and pruner are in the job's own Hydra config (`hydra.sweeper`), which every launcher hands to the job (local,
joblib, SLURM, torchrun). So single runs and other sweepers are untouched: `trial_callback(cfg)` is None there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lab.callbacks.base import Callback

log = logging.getLogger(__name__)

SWEEPER = "hydra_plugins.lab_optuna.LabOptunaSweeper"


def open_storage(spec: Any) -> Any:
    """An Optuna storage from a URL (`sqlite:///<file>`, any RDB URL) or a `_target_` config (journal file).

    SQLite waits up to a minute for a lock, for parallel jobs reporting at once; its folder is created first
    (SQLite does not create folders). SQLite locking is unsafe on NFS-like shared filesystems: use the journal
    file storage there (`hydra/sweeper/storage=journal`).
    """
    import optuna

    if isinstance(spec, str):
        if spec.startswith("sqlite:///"):
            Path(spec.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(spec, engine_kwargs={"connect_args": {"timeout": 60}})
    from hydra.utils import instantiate

    file_path = spec.get("log_storage", {}).get("file_path")
    if file_path:
        Path(file_path).parent.mkdir(parents=True, exist_ok=True)
    return instantiate(spec)


def build_pruner(spec: DictConfig | None) -> Any:
    """The configured pruner; `None` (`hydra/sweeper/pruner=none`) → Optuna's NopPruner (never prunes)."""
    import optuna
    from hydra.utils import instantiate

    return instantiate(spec) if spec else optuna.pruners.NopPruner()


def trial_callback(cfg: DictConfig) -> TrialReporter | None:
    """The callback reporting to this job's trial when it runs under lab's Optuna sweeper; else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN or hydra.sweeper.get("_target_") != SWEEPER:
        return None
    return TrialReporter(hydra.sweeper, int(hydra.job.num), int(cfg.trainer.max_epochs))


class TrialReporter(Callback):
    """Reports the monitored metric to the trial after every validation; stops training when Optuna prunes.

    Under torchrun only rank 0 talks to the study and broadcasts the decision, so all ranks stop together.
    """

    def __init__(self, sweeper: DictConfig, number: int, max_epochs: int) -> None:
        import optuna

        from lab.runtime import check_launch_env

        self.number, self.max_epochs = number, max_epochs
        self.pruned_epoch: int | None = None
        self.validations = 0  # this job's validations so far: the step of each report
        self.trial = None
        if check_launch_env()[0] == 0:  # rank 0
            storage = open_storage(sweeper.storage)
            study = optuna.load_study(study_name=sweeper.study_name, storage=storage,
                                      pruner=build_pruner(sweeper.pruner))  # fmt: skip
            self.single_objective = len(study.directions) == 1
            study_id = storage.get_study_id_from_name(sweeper.study_name)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
            self.trial = optuna.trial.Trial(study, trial_id)
            # A trial continued from its checkpoint (an interrupted sweep run again) reports after what it had.
            self.validations = max(storage.get_trial(trial_id).intermediate_values, default=0)

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        epoch = trainer.state.epoch
        prune = False
        self.validations += 1
        if self.trial is not None and self.single_objective and trainer.monitor in metrics:
            # Step = the count of validations: distinct when an epoch validates more than once
            # (trainer.val_check_interval < 1), and the same for every trial of the sweep.
            self.trial.report(float(metrics[trainer.monitor]), step=self.validations)
            # Stopping after the last epoch saves nothing: the trial completes instead.
            prune = epoch < self.max_epochs and self.trial.should_prune()
        prune = _broadcast(prune)
        if prune:
            log.info("Optuna pruned trial %d after epoch %d: stopping", self.number, epoch)
            self.pruned_epoch = epoch
            trainer.should_stop = True

    def outcome(self) -> dict[str, Any]:
        """What metrics.json adds: `status: pruned` (the sweeper tells Optuna PRUNED) and the epoch."""
        if self.pruned_epoch is None:
            return {"trial": self.number}
        return {"trial": self.number, "status": "pruned", "pruned_epoch": self.pruned_epoch}


def _broadcast(flag: bool) -> bool:
    """Rank 0's decision on every rank (one process: the flag itself)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])
