"""`python bench/first_step.py SCRIPT [args]` runs SCRIPT exactly as `python SCRIPT [args]` would, and prints
`FIRST_STEP <unix time>` at its first optimizer step and `IMPORTED <modules>` when it exits: which of the heavy
optional libraries (`WATCHED`) the run imported. bench.py subtracts the time it started this process."""

import atexit
import runpy
import sys
import time
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_post_hook

WATCHED = ("torchvision", "torchmetrics", "scipy", "matplotlib", "sklearn", "wandb", "onnx", "optuna")


def first_step(optimizer, args, kwargs) -> None:
    if not first_step.seen:
        first_step.seen = True
        print(f"FIRST_STEP {time.time():.4f}", flush=True)


first_step.seen = False


@atexit.register
def imported() -> None:
    print("IMPORTED " + ",".join(m for m in WATCHED if m in sys.modules), flush=True)


register_optimizer_step_post_hook(first_step)
script = str(Path(sys.argv[1]).resolve())
sys.argv = [script, *sys.argv[2:]]
runpy.run_path(script, run_name="__main__")
