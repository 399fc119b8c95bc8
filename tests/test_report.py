"""Experiments you can report: a sweep over seeds aggregated per configuration (checked against statistics
computed here), the sweep report and its figures, the code a sweep ran, Optuna's plots, and `lab.compare`."""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, in_process
from PIL import Image

from lab import sweep_summary

JOB = ["trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
       "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1", "trainer.progress_bar=false",
       "print_config=false", "model=mlp", "checkpoint=none"]  # fmt: skip


def multirun(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return in_process("train.py", ["-m", f"hydra.sweep.dir={sweep_dir}", *JOB, *overrides], check=True)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """Two learning rates × two seeds: two configurations of two repeats each."""
    sweep_dir = tmp_path_factory.mktemp("seeds") / "sweep"
    return sweep_dir, multirun(sweep_dir, "sweep=seeds", "trainer.seed=range(2)", "optimizer.lr=1e-3,3e-2")


def jobs_by_lr(sweep_dir: Path) -> dict[str, list[dict]]:
    by_lr: dict[str, list[dict]] = {}
    for job in sorted(sweep_dir.glob("[0-9]*")):
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        lr = "1e-3" if "optimizer.lr=0.001" in overrides else "3e-2"
        by_lr.setdefault(lr, []).append(json.loads((job / "metrics.json").read_text()))
    return by_lr


def compare(*args: str) -> subprocess.CompletedProcess:
    """`python -m lab.compare ...`: the real command, in its own process."""
    return subprocess.run([sys.executable, "-m", "lab.compare", *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip


def png_description(path: Path) -> str:
    assert path.is_file() and path.stat().st_size > 1000, path
    return Image.open(path).text["Description"]


def test_seeds_are_aggregated_per_configuration(seeds: tuple[Path, subprocess.CompletedProcess]) -> None:
    from scipy.stats import t  # here, not at the top: each pytest worker would pay its import when collecting

    sweep_dir, proc = seeds
    by_lr = jobs_by_lr(sweep_dir)
    assert {lr: len(jobs) for lr, jobs in by_lr.items()} == {"1e-3": 2, "3e-2": 2}
    with open(sweep_dir / "summary_configs.csv", newline="") as f:
        rows = {row["configuration"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"optimizer.lr=0.001", "optimizer.lr=0.03"}
    for lr, jobs in by_lr.items():
        row = rows[f"optimizer.lr={float(lr)}"]
        for metric in ("best", "val/acc", "test/acc", "test/loss"):
            values = [job[metric] for job in jobs]
            n = len(values)  # the sample standard deviation (n - 1) and Student's t with n - 1 degrees
            mean = sum(values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
            assert float(row[f"{metric}_mean"]) == pytest.approx(mean, abs=1e-9), metric
            assert float(row[f"{metric}_std"]) == pytest.approx(std, abs=1e-9), metric
            assert int(row[f"{metric}_n"]) == n == 2
            assert float(row[f"{metric}_ci95"]) == pytest.approx(
                t.ppf(0.975, n - 1) * std / math.sqrt(n), abs=1e-9
            )
    # Ranked by the mean of the monitored value (val/acc, max): rank 1 holds the larger mean.
    means = {lr: statistics.fmean(job["best"] for job in jobs) for lr, jobs in by_lr.items()}
    best_lr = float(max(means, key=means.__getitem__))
    assert rows[f"optimizer.lr={best_lr}"]["rank"] == "1"
    assert f"best configuration: optimizer.lr={best_lr}" in proc.stdout
    run_again = next(line for line in proc.stdout.splitlines() if "run it again:" in line)
    assert f"optimizer.lr={best_lr}" in run_again  # the best job of the best configuration
    summary = (sweep_dir / "summary.md").read_text()
    assert "## Configurations (mean ± std over repeats" in summary
    assert f"| 1 | optimizer.lr={best_lr} | 2 |" in summary


def test_the_report_has_curves_per_configuration_and_parameters(
    seeds: tuple[Path, subprocess.CompletedProcess],
) -> None:
    sweep_dir, proc = seeds
    assert f"sweep report: {sweep_dir / 'report.md'}" in proc.stdout
    text = (sweep_dir / "report.md").read_text()
    assert "![val/acc curves](figures/curves.png)" in text
    assert "![val/acc against optimizer.lr](figures/param_optimizer.lr.png)" in text
    # One mean ± std band per configuration (not one line per job), each over its 2 seeds.
    count, *labels = png_description(sweep_dir / "figures" / "curves.png").splitlines()
    assert count == "2 curves" and set(labels) == {"optimizer.lr=0.001 (n=2)", "optimizer.lr=0.03 (n=2)"}
    assert png_description(sweep_dir / "figures" / "param_optimizer.lr.png").splitlines()[0] == "2 points"
    # Rebuilt by one command.
    (sweep_dir / "report.md").unlink()
    assert sweep_summary.main([str(sweep_dir)]) == 0
    assert (sweep_dir / "report.md").read_text() == text


def test_the_sweep_records_its_code_and_flags_jobs_that_ran_other_code(
    seeds: tuple[Path, subprocess.CompletedProcess],
) -> None:
    sweep_dir, _ = seeds
    code = sweep_dir / "code"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert (code / "commit.txt").read_text().strip() == head
    diff = subprocess.run(["git", "diff", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert (code / "diff.patch").read_text().strip() == diff
    assert (code / "conf" / "train.yaml").read_text() == (ROOT / "conf" / "train.yaml").read_text()
    assert "Code changed" not in (sweep_dir / "summary.md").read_text()
    # A job that ran while the code was edited records another diff: the rebuilt summary names it.
    info_path = sweep_dir / "2" / "run_info.json"
    info = json.loads(info_path.read_text())
    info["git_diff_sha256"] = "0" * 64
    info_path.write_text(json.dumps(info))
    assert sweep_summary.main([str(sweep_dir)]) == 0
    assert "job(s) 2 ran other code than the sweep started from" in (sweep_dir / "summary.md").read_text()


def test_an_optuna_sweep_report_has_optunas_plots(tmp_path: Path) -> None:
    import optuna

    multirun(tmp_path, "sweep=optuna", "hydra.sweeper.n_trials=3", "~hydra.sweeper.params",
             "optimizer.lr=tag(log, interval(1e-4, 1e-1))", "dataset.batch_size=choice(32,64)")  # fmt: skip
    study = optuna.load_study(study_name="train", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.metric_names == ["val/acc"]
    text = (tmp_path / "report.md").read_text()
    for name in ("optuna_history", "optuna_importances", "optuna_parallel_coordinate", "optuna_slice"):
        assert f"(figures/{name}.png)" in text, name
        path = tmp_path / "figures" / f"{name}.png"
        assert path.is_file() and path.stat().st_size > 1000, name
    assert png_description(tmp_path / "figures" / "curves.png").splitlines()[0] == "3 curves"  # one per trial


def test_compare_prints_differences_and_draws_overlaid_curves(
    seeds: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    sweep_dir, _ = seeds
    out = tmp_path / "cmp.png"
    proc = compare(str(sweep_dir / "0"), str(sweep_dir / "3"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    first, last = (json.loads((sweep_dir / j / "metrics.json").read_text()) for j in ("0", "3"))
    lines = proc.stdout.splitlines()
    differing = lines[lines.index("config keys that differ:") + 3 :]
    assert any(line.split()[:3] == ["optimizer.lr", "0.001", "0.03"] for line in differing), proc.stdout
    assert any(line.split()[:3] == ["trainer.seed", "0", "1"] for line in differing), proc.stdout
    row = next(line for line in lines if line.startswith("test/acc "))
    assert row.split()[1:] == [f"{first['test/acc']:.4f}", f"{last['test/acc']:.4f}"]
    assert f"curves (val/acc, train/loss): {out}" in proc.stdout
    assert png_description(out).splitlines()[0] == "4 curves"  # two runs × two panels
    again = compare(str(sweep_dir / "0"), "--out", str(out))
    assert again.returncode == 2 and again.stderr.strip().startswith("error: exists already")
