"""`lab.fit(overrides=[...])`: a run from Python writes the run folder `python train.py` writes and returns its
metrics; a config mistake raises one exception whose message is the command line's error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import QUIET, ROOT, cli_env, isolated_process, train

import lab
from lab.errors import UserError

FAST = ["debug=fast", "logger=csv", *QUIET]


def test_fit_returns_the_metrics_and_writes_the_cli_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with isolated_process(cli_env(), ROOT):
        result = lab.fit([*FAST, f"hydra.run.dir={run_dir}"])
    assert result.run_dir == run_dir
    assert result.metrics == json.loads((run_dir / "metrics.json").read_text())
    assert result.metrics["status"] == "success" and 0 <= result.metrics["val/acc"] <= 1
    # What Hydra writes for `python train.py`: the composed config, the overrides, the log; then lab's files.
    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        ".hydra/hydra.yaml",
        "train.log",
        "metrics.csv",
    ):
        assert (run_dir / name).is_file(), name
    assert "- debug=fast" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "final:" in (run_dir / "train.log").read_text()


def test_fit_takes_the_model_and_task_a_dataset_brings(tmp_path: Path) -> None:
    """As on the command line, `dataset=diabetes` brings `model=mlp` and `task=regression`."""
    run_dir = tmp_path / "run"
    with isolated_process(cli_env(), ROOT):
        result = lab.fit(["dataset=diabetes", *FAST, f"hydra.run.dir={run_dir}"])
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "- model=mlp" in overrides and "- task=regression" in overrides
    assert result.metrics["status"] == "success" and "val/mae" in result.metrics


@pytest.mark.parametrize(
    "overrides",
    [["model=mlp", "model.hiden=32"], ["optimizer.lr=0"], ["scheduler=step", "scheduler.step_size=0"]],
)
def test_a_config_mistake_raises_the_cli_line(overrides: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "api"
    with isolated_process(cli_env(), ROOT), pytest.raises(UserError) as error:
        lab.fit([*FAST, f"hydra.run.dir={run_dir}", *overrides])
    cli = train(tmp_path / "api", *FAST, *overrides, check=False)  # the same run dir: the same line
    lines = [line for line in cli.stderr.splitlines() if line.startswith("error: ")]
    assert cli.returncode == 2 and [str(error.value)] == lines
    assert not list(run_dir.glob("checkpoints/*"))
