"""Shared test helpers: compose configs like Hydra does, and run the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import lab  # noqa: F401  (registers resolvers)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Small and quick, but still real training: two epochs of a few batches.
TINY = ["trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.log_every_n_steps=2"]


def compose_config(overrides: list[str] = (), output_dir: Path | str = "/tmp/lab-test") -> DictConfig:
    """The config `python train.py <overrides>` would run with (paths.output_dir pointed at a temp dir)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides])


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    env.update(PYTHONPATH=str(ROOT / "src"), WANDB_MODE="offline", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    env.update(extra)
    return env


def run_train(
    run_dir: Path | None,
    *overrides: str,
    check: bool = True,
    script: str = "train.py",
    timeout: float = 300,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """`python train.py hydra.run.dir=<run_dir> <overrides>` in a subprocess, stdin closed."""
    args = [sys.executable, str(ROOT / script), "trainer.progress_bar=false", "print_config=false"]
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    proc = subprocess.run(
        [*args, *overrides],
        cwd=cwd or ROOT,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture
def tmp_outputs(tmp_path: Path) -> Path:
    return tmp_path / "outputs"
