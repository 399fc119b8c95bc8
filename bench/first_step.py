"""`python bench/first_step.py [overrides]` runs `train.py` exactly as `python train.py` would, and at the first
optimizer step prints `FIRST_STEP <unix time> <whether torchvision was imported>` and exits. bench.py subtracts the
time it started this process."""

import os
import runpy
import sys
import time
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_post_hook

ROOT = Path(__file__).resolve().parents[1]


def stop_at_first_step(optimizer, args, kwargs) -> None:
    vision = "torchvision imported" if "torchvision" in sys.modules else "torchvision not imported"
    print(f"FIRST_STEP {time.time():.4f} {vision}", flush=True)
    os._exit(0)


register_optimizer_step_post_hook(stop_at_first_step)
sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
