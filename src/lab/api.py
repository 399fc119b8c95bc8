"""`lab.fit(overrides=[...])`: one training run from Python (a notebook, Ray Tune, a cluster's own scheduler).

It runs what `python train.py <overrides>` runs, through Hydra's own run machinery (the same composition, run
folder, `.hydra/` files, `train.log` and Hydra callbacks), and returns the final metrics and the run folder. A
config mistake raises one `lab.errors.UserError` whose message is the line the command line prints.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.errors import UserError


@dataclass(frozen=True)
class FitResult:
    """What a finished run left: `metrics` is the dict its `metrics.json` holds, `run_dir` its folder."""

    metrics: dict[str, Any]
    run_dir: Path


def fit(overrides: Sequence[str] = ()) -> FitResult:
    """Train (and test) like `python train.py <overrides>`, e.g. `fit(["model=mlp", "trainer.max_epochs=3"])`.

    Raises `UserError` (message: `error: <what> (<key>): <fix>`) for a config mistake, before anything is trained;
    an exception raised inside your own code (dataset, model, callback) is raised as it is.
    """
    from lab.choices import preferred_overrides
    from lab.config import CONF_DIR, run_composed
    from lab.redact import load_env
    from lab.train import run_for_api

    load_env()  # `.env` → environment, as train.py does
    overrides = [str(o) for o in overrides]
    overrides += preferred_overrides(overrides, CONF_DIR)  # dataset=diabetes → model=mlp task=regression
    failure: list[BaseException] = []

    def task(cfg: Any) -> float:
        try:
            return run_for_api(cfg)
        except UserError as e:  # raised after Hydra's run returns: Hydra would print its own report first
            failure.append(e)
            return float("nan")

    job = run_composed(overrides, task)  # a config mistake: the CLI's line, nothing written
    if failure:
        raise failure[0]
    run_dir = Path(job.hydra_cfg.hydra.runtime.output_dir)
    return FitResult(json.loads((run_dir / "metrics.json").read_text()), run_dir)
