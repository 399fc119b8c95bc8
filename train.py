"""Train a model: `python train.py [group=option ...] [key=value ...]`; `-m` runs a sweep. See README.md."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import lab  # noqa: F401  (registers the config resolvers)

CONF = Path(__file__).resolve().parent / "conf"


def train(cfg: DictConfig) -> float:
    from lab.train import main as run

    return run(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    from lab.config import SweepConfig, precheck, run_composed
    from lab.errors import UserError
    from lab.redact import load_env

    load_env()  # `.env` (git-ignored) → environment, before Hydra composes the config
    from lab.loggers.wandb import agent_argv

    sys.argv = agent_argv(sys.argv)  # under `wandb agent`: W&B's values as Hydra overrides (None → null ...)
    from lab.choices import preferred_overrides

    sys.argv += preferred_overrides(sys.argv[1:], CONF)  # dataset=diabetes → model=mlp task=regression
    distributed = os.environ.get("WORLD_SIZE", "1") != "1"
    flags = any(arg.startswith("-") or arg.lstrip("+~").startswith("hydra.mode=") for arg in sys.argv[1:])
    if not distributed and not flags:
        # One run, no Hydra flags: Hydra's run composes the config once; a mistake in it is one line.
        try:
            run_composed(sys.argv[1:], train)
        except SweepConfig:  # the config's own files ask for a sweep (nothing was run): Hydra runs it
            main()
        except UserError as e:
            e.exit()
    else:  # a sweep, Hydra's flags (--cfg, --help, ...) or torchrun: Hydra's own command line
        try:
            precheck(sys.argv[1:])  # an unknown key, a wrong type or option: one line, before Hydra starts
        except UserError as e:
            e.exit()
        if distributed:  # under torchrun: every rank takes rank 0's run dir
            from lab.distributed import WRITES_NOTHING, agree_on_run, refuse_multirun

            refuse_multirun(sys.argv[1:])
            agree_on_run()
            if os.environ.get("RANK", "0") != "0":  # rank 0 alone writes the run dir, other nodes nothing
                sys.argv += WRITES_NOTHING
        main()
