"""One rank of a sweep job started by the torchrun launcher (src/hydra_plugins/lab_torchrun.py).

`python -m lab.torchrun_job <job.pkl>` under torchrun: runs the job through Hydra's own `run_job`, as the other
launchers do, so the job sees a normal multirun (its job dir, `hydra.job.num`, the sweeper's config); rank 0
writes the job's return next to the job file.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any


def main(path: str) -> int:
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus, run_job, setup_globals

    import lab  # noqa: F401  (registers the config resolvers)
    from lab.runtime import check_launch_env

    job: dict[str, Any] = pickle.loads(Path(path).read_bytes())
    Singleton.set_state(job["singleton_state"])
    setup_globals()
    ret = run_job(hydra_context=job["hydra_context"], task_function=job["task_function"], config=job["config"],
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")  # fmt: skip
    if check_launch_env()[0] == 0:
        import cloudpickle  # classes the job file brought by value pickle back the same way

        try:
            data = cloudpickle.dumps(ret)
        except Exception:  # an exception that does not pickle: keep its text
            ret._return_value = RuntimeError(repr(ret._return_value))
            data = cloudpickle.dumps(ret)
        Path(job["result"]).write_bytes(data)
    return 1 if ret.status == JobStatus.FAILED else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
