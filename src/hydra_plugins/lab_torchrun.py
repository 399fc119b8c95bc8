"""A Hydra launcher that runs each job of a sweep as its own torchrun group: `hydra/launcher=torchrun`.

`torchrun ... train.py -m` would start one sweeper per process; instead the sweep runs in one process and this
launcher starts, per job, `torchrun --standalone --nproc_per_node=N -m lab.torchrun_job <job file>`. The job
file holds the job's composed config (sweep dir already resolved, so every rank writes to the same job dir), the
task function and Hydra's state, as hydra-submitit-launcher ships them to SLURM; rank 0 writes the job's return
back. Jobs run one after another (each uses every device of this node, or of the SLURM allocation it runs in):
one job dir, one metrics.json and one Optuna trial per job. Config: conf/hydra/launcher/torchrun.yaml.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


class TorchrunLauncher(Launcher):
    def __init__(self, nproc_per_node: int, torchrun_args: Sequence[str] = ()) -> None:
        self.nproc_per_node = int(nproc_per_node)
        self.torchrun_args = [str(a) for a in torchrun_args]

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import cloudpickle  # hydra-submitit-launcher's dependency: pickles train.py's task function by value

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        returns = []
        for num, overrides in enumerate(job_overrides, initial_job_idx):
            log.info("\t#%d (torchrun, %d processes) : %s", num, self.nproc_per_node,
                     " ".join(filter_overrides(overrides)))  # fmt: skip
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = f"torchrun_{num}"
                config.hydra.job.num = num
                config.hydra.sweep.dir = str(sweep_dir)  # resolved here, once, for every rank
            folder = sweep_dir / ".torchrun" / str(num)
            folder.mkdir(parents=True, exist_ok=True)
            job = {"hydra_context": self.hydra_context, "task_function": self.task_function, "config": config,
                   "singleton_state": Singleton.get_state(), "result": str(folder / "result.pkl")}  # fmt: skip
            (folder / "job.pkl").write_bytes(cloudpickle.dumps(job))
            returns.append(self._run(folder, overrides))
        return returns

    def _run(self, folder: Path, overrides: Sequence[str]) -> JobReturn:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={self.nproc_per_node}", *self.torchrun_args,
                   "-m", "lab.torchrun_job", str(folder / "job.pkl")]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("LAB_RUN_ID", "LAB_RUN_TIME")}
        output = folder / "torchrun.log"  # the agent's and every rank's output, also shown as it comes
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace") as proc, output.open("w") as copy:  # fmt: skip
            for line in proc.stdout:  # type: ignore[union-attr]
                sys.stdout.write(line)
                copy.write(line)
        code = proc.returncode
        result = folder / "result.pkl"
        if result.is_file():
            ret = pickle.loads(result.read_bytes())
            if code == 0 or ret.status == JobStatus.FAILED:
                return ret
        tail = "".join(output.read_text(errors="replace").splitlines(keepends=True)[-15:])
        ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
        ret._return_value = RuntimeError(
            f"torchrun exited with code {code}; its last lines:\n{tail}(all: {output})"
        )
        return ret
