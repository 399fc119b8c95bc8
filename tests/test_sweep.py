"""Sweeps (`python train.py -m ...`): job dirs, the summary, failures, lab's Optuna sweeper (resumable study in
SQLite or a journal file, pruning, multi-objective, grid), the parallel and torchrun launchers, and the launcher
configs (composed; SLURM itself cannot run here). The grid sweep is a real CLI process; most others run the same
command line in-process (`conftest.in_process`)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import CONF, Forked, cli_env, forked_ranks, in_process, run_cli
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lab import sweep_summary
from lab.errors import UserError

# One epoch of two batches per job, checkpoints and TensorBoard on.
TINY_JOB = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1"]  # fmt: skip


def multirun(
    sweep_dir: Path, *overrides: str, check: bool = True, cli: bool = False
) -> subprocess.CompletedProcess:
    """`python train.py -m hydra.sweep.dir=<sweep_dir> <tiny job> <overrides>` (`-m` must come first), in-process
    unless `cli`."""
    args = [
        "-m",
        "trainer.progress_bar=false",
        "print_config=false",
        f"hydra.sweep.dir={sweep_dir}",
        *TINY_JOB,
        *overrides,
    ]
    return (run_cli if cli else in_process)("train.py", args, check=check)


def read_csv(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def metrics_of(row: dict[str, str]) -> dict:
    return json.loads((Path(row["run_dir"]) / "metrics.json").read_text())


def kill_when(path: Path, send: Callable[[], None], timeout: float = 120) -> threading.Thread:
    """A thread that calls `send` (a SIGTERM) as soon as `path` exists: the middle of a given job."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        send()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# Jobs long enough to be stopped in the middle, with last.pt after every step.
RESUMABLE_JOB = ["trainer.max_epochs=3", "checkpoint.every_n_steps=1", "logger=csv"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    sweep_dir = tmp_path_factory.mktemp("grid") / "sweep"
    return sweep_dir, multirun(sweep_dir, "optimizer.lr=1e-3,1e-2", "dataset.batch_size=32,64", cli=True)


def test_grid_job_dirs_and_summary(grid: tuple[Path, subprocess.CompletedProcess]) -> None:
    sweep_dir, proc = grid
    # One folder per job, the code the sweep ran and the report's figures.
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [
        "0",
        "1",
        "2",
        "3",
        "code",
        "figures",
    ]
    assert (sweep_dir / "report.md").is_file() and (sweep_dir / "figures" / "curves.png").is_file()
    # Every job logs into the sweep dir, so `tensorboard --logdir <sweep dir>` compares them (HParams tab).
    for job in range(4):
        assert list((sweep_dir / str(job) / "tensorboard").glob("events.out.tfevents.*"))

    rows = read_csv(sweep_dir)
    assert len(rows) == 4 and list(rows[0]) == [
        "job", "status", "overrides", "val/acc", "test/acc", "epochs", "wall_time_s", "run_dir"]  # fmt: skip
    assert sorted(int(r["job"]) for r in rows) == [0, 1, 2, 3]
    for row in rows:
        metrics = metrics_of(row)
        assert row["status"] == "success" == metrics["status"]
        assert float(row["val/acc"]) == metrics["best"] and float(row["test/acc"]) == metrics["test/acc"]
        assert int(row["epochs"]) == metrics["epochs"] == 1 and float(row["wall_time_s"]) >= 0
        assert Path(row["run_dir"]) == sweep_dir / row["job"]
        # Only what the sweep varied; the shared overrides are listed once in summary.md.
        assert sorted(o.split("=")[0] for o in row["overrides"].split()) == [
            "dataset.batch_size",
            "optimizer.lr",
        ]
    values = [float(r["val/acc"]) for r in rows]
    assert values == sorted(values, reverse=True)  # checkpoint.mode=max: best first

    markdown = (sweep_dir / "summary.md").read_text()
    assert markdown.count("| success |") == 4 and "trainer.max_epochs=1" in markdown
    best = rows[0]
    assert f"best: job {best['job']}  val/acc={float(best['val/acc']):.4f}" in proc.stdout
    checkpoint = sweep_dir / best["job"] / "checkpoints" / "best.pt"
    assert checkpoint.is_file() and f"checkpoint: {checkpoint}" in proc.stdout


def optuna_trials(sweep_dir: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(sweep_dir / "optuna.db") as db:
        return db.execute("SELECT number, state FROM trials ORDER BY number").fetchall()


def journal_study(sweep_dir: Path, name: str):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


# Three short epochs, so that a trial can be pruned after the first or second; the median pruner compares a
# trial with the finished ones from the second trial on.
PRUNED_JOB = [
    "sweep=optuna",
    "logger=none",
    "trainer.max_epochs=3",
    "hydra.sweeper.pruner.n_startup_trials=1",
]


def check_pruned_jobs(sweep_dir: Path, states: dict[int, str]) -> None:
    """A PRUNED trial's job stopped early but normally: metrics.json says pruned, last.pt is there."""
    rows = {int(r["job"]): r for r in read_csv(sweep_dir)}
    assert {num: row["trial_state"] for num, row in rows.items()} == states
    for num, state in states.items():
        metrics = metrics_of(rows[num])
        if state == "PRUNED":
            assert metrics["status"] == "pruned" == rows[num]["status"]
            assert metrics["epochs"] == metrics["pruned_epoch"] == int(rows[num]["pruned_epoch"]) < 3
            assert (sweep_dir / str(num) / "checkpoints" / "last.pt").is_file()
            assert metrics["test/acc"] >= 0  # the final evaluation ran
        else:
            assert (metrics["status"], metrics["epochs"], rows[num]["pruned_epoch"]) == ("success", 3, "")


def test_optuna_study_in_sqlite_and_the_median_pruner_prunes_bad_trials(tmp_path: Path) -> None:
    import optuna

    proc = multirun(tmp_path, *PRUNED_JOB, "hydra.sweeper.n_trials=2")
    trials = dict(optuna_trials(tmp_path))
    assert len(trials) == 2 and trials[0] == "COMPLETE" and "PRUNED" in trials.values(), trials
    assert set(trials.values()) <= {"COMPLETE", "PRUNED"}
    check_pruned_jobs(tmp_path, trials)
    rows = read_csv(tmp_path)
    assert sorted(r["job"] for r in rows) == ["0", "1"]
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path}/optuna.db")  # the only one
    for row in rows:  # job N is trial N, and the study holds what a finished job returned
        trial = study.trials[int(row["job"])]
        if trial.state.name == "COMPLETE":
            assert trial.value == float(row["val/acc"]) == metrics_of(row)["best"]
        assert f"optimizer.lr={trial.params['optimizer.lr']}" in row["overrides"]
    assert "pruned" in (tmp_path / "summary.md").read_text()
    # The best job as a ready command line, without the sweep preset.
    best = read_csv(tmp_path)[0]
    line = next(x for x in proc.stdout.splitlines() if "run it again:" in x)
    assert line.split("run it again: ")[1].startswith("python train.py optimizer=")
    assert (
        "sweep=optuna" not in line
        and f"optimizer.lr={best['overrides'].split('optimizer.lr=')[1].split()[0]}" in line
    )


def test_optuna_parallel_journal_study_prunes_and_resumes(tmp_path: Path) -> None:
    # Two jobs at a time in their own processes, reporting to one journal-file study.
    args = [*PRUNED_JOB, "hydra/launcher=parallel", "hydra/sweeper/storage=journal", "hydra.sweeper.n_jobs=2",
            "task_name=journal"]  # fmt: skip
    multirun(tmp_path, *args, "hydra.sweeper.n_trials=2")
    assert not (tmp_path / "optuna.db").exists()
    study = journal_study(tmp_path, "journal")
    states = {t.number: t.state.name for t in study.trials}
    assert sorted(states) == [0, 1] and set(states.values()) <= {"COMPLETE", "PRUNED"}
    for trial in study.trials:  # every job reported its val/acc after each epoch it trained
        history = json.loads((tmp_path / str(trial.number) / "metrics.json").read_text())
        assert sorted(trial.intermediate_values) == list(range(1, history["epochs"] + 1))
    if "PRUNED" in states.values():
        check_pruned_jobs(tmp_path, states)

    # Resume: the study grows to 3 finished trials, new job dirs after the old ones.
    multirun(tmp_path, *args, "hydra.sweeper.n_trials=3")
    study = journal_study(tmp_path, "journal")
    assert [t.number for t in study.trials] == list(range(3))
    assert all(t.state.is_finished() for t in study.trials)
    assert sorted(int(r["job"]) for r in read_csv(tmp_path)) == list(range(3))
    check_pruned_jobs(tmp_path, {t.number: t.state.name for t in study.trials})


def test_optuna_multi_objective_and_grid_sampler(tmp_path: Path) -> None:
    # Two objectives read from each job's metrics.json; the grid sampler's 2 x 2 grid caps n_trials at 4.
    multirun(tmp_path, "sweep=optuna", "logger=none", "checkpoint=none", "task_name=mo",
             "hydra/sweeper/sampler=grid", "hydra/sweeper/pruner=none", "~hydra.sweeper.params",
             "optimizer.lr=choice(1e-3,1e-2)", "dataset.batch_size=range(32,97,64)",
             "hydra.sweeper.direction=[maximize,minimize]", "hydra.sweeper.objectives=[val/acc,val/loss]")  # fmt: skip
    import optuna

    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert len(study.trials) == 4
    assert sorted((t.params["optimizer.lr"], t.params["dataset.batch_size"]) for t in study.trials) == [
        (1e-3, 32), (1e-3, 96), (1e-2, 32), (1e-2, 96)]  # fmt: skip
    for trial in study.trials:
        metrics = json.loads((tmp_path / str(trial.number) / "metrics.json").read_text())
        assert trial.values == [metrics["val/acc"], metrics["val/loss"]]
    assert "solutions" in OmegaConf.load(tmp_path / "optimization_results.yaml")


def test_optuna_failed_trials_and_exit_code(tmp_path: Path) -> None:
    # Every trial fails validation → NaN → Optuna FAIL; the sweep ends with a summary and exit code 1.
    proc = multirun(tmp_path, "sweep=optuna", "hydra.sweeper.n_trials=2", "optimizer.lr=-1", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert optuna_trials(tmp_path) == [(0, "FAIL"), (1, "FAIL")]
    assert [r["status"] for r in read_csv(tmp_path)] == ["failed", "failed"]
    assert "error: every job of the sweep failed" in proc.stderr


def test_sweep_summary_cli_rebuilds(grid: tuple[Path, subprocess.CompletedProcess], tmp_path: Path, capsys):
    sweep_dir = tmp_path / "copy"
    shutil.copytree(grid[0], sweep_dir)
    original = (sweep_dir / "summary.csv").read_text().replace(str(grid[0]), str(sweep_dir))
    for name in ("summary.csv", "summary.md"):
        (sweep_dir / name).unlink()
    assert sweep_summary.main([str(sweep_dir)]) == 0
    assert (sweep_dir / "summary.csv").read_text() == original and (sweep_dir / "summary.md").is_file()
    assert "best: job" in capsys.readouterr().out

    # A job that never wrote metrics.json (crashed, killed) is listed as incomplete, after the finished ones.
    (sweep_dir / "2" / "metrics.json").unlink()
    assert sweep_summary.main([str(sweep_dir)]) == 0
    rows = read_csv(sweep_dir)
    assert (rows[-1]["job"], rows[-1]["status"], rows[-1]["val/acc"]) == ("2", "incomplete", "")

    assert sweep_summary.main([str(tmp_path / "missing")]) == 2
    assert "error: no such folder" in capsys.readouterr().err


def compose_hydra(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "train", overrides=["hydra.sweep.dir=/tmp/sweep", *overrides], return_hydra_config=True
        )


def test_sweep_presets_compose() -> None:
    grid = compose_hydra("sweep=grid").hydra.sweeper
    assert grid.params["optimizer.lr"] == "3e-4,1e-3,3e-3"
    optuna = compose_hydra("sweep=optuna").hydra.sweeper
    assert optuna._target_ == "hydra_plugins.lab_optuna.LabOptunaSweeper"
    assert (
        optuna.direction is None and optuna.storage == "sqlite:////tmp/sweep/optuna.db"
    )  # follows the metric
    assert optuna.sampler._target_ == "optuna.samplers.TPESampler"
    assert optuna.pruner._target_ == "optuna.pruners.MedianPruner"
    other = compose_hydra("sweep=optuna", "hydra/sweeper/sampler=cmaes", "hydra/sweeper/pruner=hyperband",
                          "hydra/sweeper/storage=journal", "trainer.max_epochs=27").hydra.sweeper  # fmt: skip
    assert instantiate(other.pruner)._max_resource == 27
    assert type(instantiate(other.sampler)).__name__ == "CmaEsSampler"  # the cmaes package is installed
    assert other.storage.log_storage.file_path == "/tmp/sweep/optuna.journal"
    assert compose_hydra("sweep=optuna", "hydra/sweeper/pruner=none").hydra.sweeper.pruner is None
    assert set(optuna.params) == {"optimizer", "optimizer.lr", "optimizer.weight_decay", "dataset.batch_size",
                                  "model.dropout"}  # fmt: skip
    assert compose_hydra("sweep=grid").hydra.callbacks.sweep_summary._target_ == "lab.sweep.SweepSummary"


def test_torchrun_launcher_composes() -> None:
    launcher = instantiate(
        compose_hydra("hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=4").hydra.launcher
    )
    assert type(launcher).__name__ == "TorchrunLauncher" and launcher.nproc_per_node == 4


def test_parallel_launcher_composes() -> None:
    launcher = instantiate(compose_hydra("hydra/launcher=parallel", "hydra.launcher.n_jobs=3").hydra.launcher)
    assert type(launcher).__name__ == "JoblibLauncher" and launcher.joblib["n_jobs"] == 3


def test_slurm_launcher_composes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import submitit

    cfg = compose_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
                        "hydra.launcher.timeout_min=240", "hydra.launcher.cpus_per_task=16")  # fmt: skip
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    # No SLURM here: a fake `srun` on PATH lets submitit build its executor, then we read the sbatch script the
    # launcher would submit, with the parameters mapped as SlurmLauncher.launch maps them.
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(cluster="slurm", folder=str(tmp_path / "submitit"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))  # fmt: skip
    params.pop("submitit_folder")
    base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
            "stderr_to_stdout"}  # fmt: skip
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python train.py", "0")
    for line in ("--partition=gpu", "--gpus-per-node=4", "--time=240", "--cpus-per-task=16", "--mem=32GB"):
        assert f"#SBATCH {line}\n" in script
    assert OmegaConf.select(cfg, "hydra.launcher.submitit_folder") == "/tmp/sweep/.submitit/%j"


@pytest.mark.slow
def test_torchrun_launcher_runs_each_job_as_a_process_group(tmp_path: Path) -> None:
    from conftest import compose_config

    from lab.data import build_data

    # One Optuna trial, one job of 2 gloo processes; one full epoch in batches that hold half of the training data
    # but not all of it: one step per rank shows the data split (the whole data would take two).
    train_size = len(build_data(compose_config(["dataset=digits"]).dataset).train)
    batch_size = train_size - 1
    proc = multirun(tmp_path, "sweep=optuna", "hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=2",
                    "model=mlp", "logger=none", "hydra.sweeper.n_trials=1", f"dataset.batch_size={batch_size}",
                    "trainer.limit_train_batches=null")  # fmt: skip
    assert optuna_trials(tmp_path) == [(0, "COMPLETE")]
    dirs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert dirs == ["0", "code", "figures"]  # the job, the code the sweep started from, the report's figures
    metrics = json.loads((tmp_path / "0" / "metrics.json").read_text())
    assert metrics["status"] == "success" and metrics["trial"] == 0
    # Each rank trains on half of the data.
    assert metrics["global_step"] == -(-train_size // 2 // batch_size) == 1
    assert (tmp_path / "0" / "train.log").read_text().count("epoch 1/1") == 1  # rank 0 logs
    assert "best: job" in proc.stdout


def test_torchrun_launcher_failure_shows_what_torchrun_said(tmp_path: Path) -> None:
    # torchrun itself fails (an option it does not know): the job's error carries torchrun's last lines, and
    # the whole output stays in the job's .torchrun folder.
    proc = multirun(tmp_path, "hydra/launcher=torchrun", "hydra.launcher.torchrun_args=[--no-such-option]",
                    "logger=none", check=False)  # fmt: skip
    assert proc.returncode != 0
    log_file = tmp_path / ".torchrun" / "0" / "torchrun.log"
    assert "torchrun exited with code 2; its last lines:" in proc.stderr
    assert "error: unrecognized arguments: --no-such-option" in proc.stderr
    assert f"(all: {log_file})" in proc.stderr
    assert "unrecognized arguments: --no-such-option" in log_file.read_text()


def test_multirun_under_torchrun_fails_at_once(tmp_path: Path) -> None:
    # `torchrun --standalone --nproc_per_node=2 train.py -m ...`: its two ranks, forked with the environment torchrun
    # gives them. Each stops before any rendezvous (which would wait for the other rank); rank 0 says why.
    proc = forked_ranks("train.py", ["-m", "optimizer.lr=0.005,0.01"], check=False, timeout=120)
    assert all(rank.returncode != 0 for rank in proc.ranks)
    stderr = "".join(rank.stderr for rank in proc.ranks)
    lines = [x for x in stderr.splitlines() if x.startswith("error: ")]
    assert lines == [
        "error: a sweep (-m) under torchrun runs one sweeper per process (torchrun ... train.py -m): run the sweep "
        "without torchrun and give each job its own torchrun group: python train.py -m hydra/launcher=torchrun "
        "hydra.launcher.nproc_per_node=N ..."
    ]


def test_optuna_config_errors_are_one_line(tmp_path: Path) -> None:
    # Refused by the sweeper before any job runs: an interval on a grid, a pruner on two objectives.
    proc = multirun(tmp_path / "a", "sweep=optuna", "hydra/sweeper/sampler=grid", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "error: the grid sampler cannot sweep the interval of optimizer.lr (hydra.sweeper.params)"
        in proc.stderr
    )
    proc = multirun(tmp_path / "b", "sweep=optuna", "hydra.sweeper.direction=[maximize,minimize]",
                    "hydra.sweeper.objectives=[val/acc,val/loss]", check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: Optuna prunes single-objective studies only (hydra.sweeper.pruner)" in proc.stderr
    assert not list(tmp_path.glob("*/0"))  # no job started


def test_a_failed_job_does_not_stop_the_sweep_and_a_rerun_skips_finished_jobs_reruns_failed_ones_and_refuses_another_sweep(
    tmp_path: Path,
) -> None:
    """A failed job is recorded and the sweep goes on. A job's result is only what this job wrote: re-running the
    same sweep keeps the finished job as it was, runs the failed one again (its earlier attempt moved aside), and a
    different sweep in the folder is refused."""
    sweep = ("optimizer.lr=-1,1e-3", "logger=csv")
    proc = multirun(tmp_path, *sweep)
    assert proc.returncode == 0
    assert "error: must be a learning rate in (0, 1], got -1 (optimizer.lr)" in proc.stderr
    failed, ok = sorted(read_csv(tmp_path), key=lambda r: r["job"])
    assert (failed["status"], failed["val/acc"], failed["overrides"]) == ("failed", "", "optimizer.lr=-1")
    assert ok["status"] == "success" and float(ok["val/acc"]) == metrics_of(ok)["best"]
    assert [r["job"] for r in read_csv(tmp_path)] == ["1", "0"]  # failed jobs last
    assert "1 success, 1 failed" in (tmp_path / "summary.md").read_text()

    done = tmp_path / "1" / "metrics.json"
    before = (
        done.read_bytes(),
        done.stat().st_mtime_ns,
        (tmp_path / "1" / "checkpoints" / "last.pt").read_bytes(),
    )
    proc = multirun(tmp_path, *sweep)
    after = (
        done.read_bytes(),
        done.stat().st_mtime_ns,
        (tmp_path / "1" / "checkpoints" / "last.pt").read_bytes(),
    )
    assert after == before  # not trained again
    assert (
        "sweep job 1: success in an earlier run of this sweep" in (tmp_path / "1" / "train.log").read_text()
    )
    failed = json.loads((tmp_path / "0" / "metrics.json").read_text())
    assert failed["status"] == "failed" and (tmp_path / "0" / "failed-attempt-1" / "metrics.json").is_file()
    assert "1 success, 1 failed" in (tmp_path / "summary.md").read_text() and "best: job 1" in proc.stdout

    proc = multirun(tmp_path, "optimizer.lr=-1,1e-4", "logger=csv", check=False)
    assert proc.returncode == 2 and not (tmp_path / "2").exists()
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: the sweep dir holds the jobs of another sweep (trainer.progress_bar=false")
    )
    assert json.loads(done.read_text()) == json.loads(before[0])


def test_sigterm_in_the_middle_of_a_grid_sweep_then_rerun_resumes_it(tmp_path: Path) -> None:
    """A sweep process (forked from this one) gets SIGTERM while job 1 trains: exit 143, job 1 keeps its last.pt;
    the same command again skips job 0, resumes job 1 from its own last.pt, and the summary counts these two jobs."""
    args = ["-m", "trainer.progress_bar=false", "print_config=false", f"hydra.sweep.dir={tmp_path}", *TINY_JOB,
            *RESUMABLE_JOB, "optimizer.lr=1e-3,1e-2"]  # fmt: skip
    proc = Forked("train.py", args)
    kill_when(tmp_path / "1" / "checkpoints" / "last.pt", lambda: proc.send_signal(signal.SIGTERM))
    out = "\n".join(proc.communicate(timeout=300))
    assert proc.returncode == 143, out
    assert not (tmp_path / "1" / "metrics.json").exists()
    first = json.loads((tmp_path / "0" / "metrics.json").read_text())

    rerun = in_process("train.py", args, check=True)
    assert json.loads((tmp_path / "0" / "metrics.json").read_text()) == first
    log = (tmp_path / "1" / "train.log").read_text()
    assert f"sweep job 1: resuming from its own {tmp_path / '1' / 'checkpoints' / 'last.pt'}" in log
    assert "resumed from" in log
    rows = read_csv(tmp_path)
    assert sorted(r["job"] for r in rows) == ["0", "1"] and {r["status"] for r in rows} == {"success"}
    assert all(metrics_of(r)["epochs"] == 3 for r in rows)
    steps = [
        int(line.split(",")[0]) for line in (tmp_path / "1" / "metrics.csv").read_text().splitlines()[1:]
    ]
    assert steps == sorted(set(steps))  # every step once, though job 1 ran in two processes
    assert "2 jobs: 2 success" in rerun.stdout


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["sweep=optuna", "+hydra.sweeper.params={model.nope:'choice(1,2)'}"],
         "error: the search space sweeps model.nope, which this config does not have (model=simple_cnn) "
         "(hydra.sweeper.params.model.nope): check the name (`python train.py --cfg job` prints the config), add it "
         "with +model.nope=..., or drop the preset's search space ('~hydra.sweeper.params') and give yours on the "
         "command line"),
        (["model.nope=1,2"],
         "error: the search space sweeps model.nope, which this config does not have (model=simple_cnn) "
         "(model.nope): check the name (`python train.py --cfg job` prints the config) or add it with "
         "+model.nope=..."),
        (["trainer.max_epochs=1,abc"],
         "error: the search space gives trainer.max_epochs the value 'abc': Value 'abc' of type 'str' could not be "
         "converted to Integer (trainer.max_epochs): give values of the key's type"),
    ],
)  # fmt: skip
def test_search_space_is_checked_before_the_first_job(
    overrides: list[str], line: str, tmp_path: Path
) -> None:
    proc = multirun(tmp_path, *overrides, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line]
    assert not list(tmp_path.glob("*/.hydra"))  # no job started


def test_objective_directions_follow_their_metrics() -> None:
    from hydra_plugins.lab_optuna import directions

    assert directions(None, None, "val/loss", "min") == ["minimize"]  # the monitor: checkpoint.mode
    assert directions(None, ["val/loss", "val/acc_top5", "val/mae"], "val/acc", "max") == [
        "minimize", "maximize", "minimize"]  # fmt: skip
    assert directions(["maximize", "minimize"], ["val/acc", "val/loss"], "val/acc", "max") == [
        "maximize",
        "minimize",
    ]
    with pytest.raises(UserError, match=r"cannot tell whether val/foo should be maximized or minimized"):
        directions(None, ["val/foo"], "val/acc", "max")
    with pytest.raises(
        UserError, match=r"the objective val/loss would be maximized, but better is minimized"
    ):
        directions("maximize", ["val/loss"], "val/acc", "max")
    assert directions("minimize", ["val/foo"], "val/acc", "max") == ["minimize"]


def test_optuna_objective_loss_is_minimised_and_every_record_names_the_same_best_trial(
    tmp_path: Path,
) -> None:
    """`objectives=[val/loss]` without a direction minimises; the study, optimization_results.yaml and the summary
    name one best trial; with two validations an epoch every value reaches the pruner at its own step."""
    import optuna

    proc = multirun(tmp_path, "sweep=optuna", "logger=none", "checkpoint=none", "hydra.sweeper.n_trials=2",
             "hydra.sweeper.objectives=[val/loss]", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
             "trainer.val_check_interval=0.5", "task_name=loss")  # fmt: skip
    study = optuna.load_study(study_name="loss", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert study.direction.name == "MINIMIZE"
    best = study.best_trial
    assert best.value == min(t.value for t in study.trials if t.state.name == "COMPLETE")
    assert OmegaConf.load(tmp_path / "optimization_results.yaml").best_value == best.value
    assert read_csv(tmp_path)[0]["job"] == str(best.number)
    assert f"best: job {best.number}  objective={best.value:.4f}" in proc.stdout
    assert "sorted by the Optuna study's objective" in (tmp_path / "summary.md").read_text()
    for trial in study.trials:  # 2 epochs x 2 validations: steps 1..4
        assert sorted(trial.intermediate_values) == [1, 2, 3, 4], trial.number


# In the job's process, on its first run only: right after optimizer step 3, the signal SLURM sends before the time
# limit or on preemption (SIGUSR2), to the job itself. No SLURM here: submitit's local executor stands in for it
# (same signal handling, and it requeues a job that asks to be, as SLURM does).
PREEMPT_AT_STEP_3 = """
import os

if os.environ.get("SUBMITIT_LOCAL_GLOBALID") and not os.path.exists(os.environ["PREEMPTED_MARK"]):
    import signal

    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = [0]

    def preempt(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == 3:
            open(os.environ["PREEMPTED_MARK"], "w").close()
            os.kill(os.getpid(), signal.SIGUSR2)

    register_optimizer_step_post_hook(preempt)
"""
REQUEUED = ["model=mlp", "model.dropout=0", "logger=csv", "trainer.deterministic=true", "trainer.max_epochs=1",
            "trainer.limit_train_batches=6", "checkpoint.every_n_steps=100", "checkpoint.async_write=false"]  # fmt: skip


@pytest.mark.slow
def test_a_preempted_submitit_job_writes_last_pt_is_requeued_and_resumes_in_its_job_dir(
    tmp_path: Path,
) -> None:
    from conftest import train

    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PREEMPT_AT_STEP_3)
    env = cli_env(PREEMPTED_MARK=str(tmp_path / "preempted"))
    env["PYTHONPATH"] = f"{probe}{os.pathsep}{env['PYTHONPATH']}"
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher._target_=hydra_plugins.lab_submitit.LocalLauncher",
            f"hydra.sweep.dir={sweep}", "trainer.progress_bar=false", "print_config=false", *REQUEUED]  # fmt: skip
    # The sweep's own process (forked); submitit starts each run of the job as a fresh process.
    sweeper = Forked("train.py", args, env=env)
    out, err = sweeper.communicate(timeout=300)
    assert sweeper.returncode == 0, out[-3000:] + err[-3000:]
    assert (tmp_path / "preempted").exists()  # the signal came, in the first run
    submitit_logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in submitit_logs  # by submitit, after lab's stop

    job = sweep / "0"
    log = (job / "train.log").read_text()
    assert "SIGUSR2 received: stopping after this step" in log
    # last.pt of step 3 (checkpoint.every_n_steps=100 would write none before the end), then the requeued job:
    assert f"sweep job 0: resuming from its own {job}/checkpoints/last.pt" in log
    assert "at epoch 0, step 3" in log
    assert json.loads((job / "metrics.json").read_text())["status"] == "success"

    train(tmp_path / "uninterrupted", *REQUEUED)
    resumed = torch.load(job / "checkpoints" / "last.pt", weights_only=True)
    reference = torch.load(tmp_path / "uninterrupted" / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["global_step"] == reference["global_step"] == 6
    torch.testing.assert_close(resumed["model"], reference["model"], rtol=0, atol=0)


def test_optuna_sweep_rerun_resumes_its_interrupted_trial_reruns_its_failed_one_and_keeps_the_rest(
    tmp_path: Path,
) -> None:
    """Trial 0 diverges (its weights turned NaN after its first step: a fault, not its parameters), trial 1
    completes, SIGTERM while trial 2 trains. The same command again: trial 2 continues from its own last.pt, trial
    0's parameters run again as trial 3, trial 1 is not trained again; the study ends with the 3 completed trials
    asked for, and the summary and optimization_results.yaml name the study's best trial."""
    import optuna
    from torch.optim.optimizer import register_optimizer_step_post_hook

    args = ["sweep=optuna", "task_name=study", *RESUMABLE_JOB, "hydra.sweeper.n_trials=3"]
    steps = [0]

    def diverge_first_step(optimizer, *_) -> None:
        steps[0] += 1
        if steps[0] == 1:
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        param.fill_(float("nan"))

    hook = register_optimizer_step_post_hook(diverge_first_step)
    previous = signal.signal(signal.SIGTERM, lambda *_: pytest.fail("SIGTERM outside the training loop"))
    try:
        kill_when(tmp_path / "2" / "checkpoints" / "last.pt", lambda: os.kill(os.getpid(), signal.SIGTERM))
        proc = multirun(tmp_path, *args, check=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
        hook.remove()
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert optuna_trials(tmp_path) == [(0, "FAIL"), (1, "COMPLETE"), (2, "RUNNING")]
    assert json.loads((tmp_path / "0" / "metrics.json").read_text())["status"] == "diverged"
    interrupted_at = torch.load(tmp_path / "2" / "checkpoints" / "last.pt", weights_only=True)["global_step"]
    done = tmp_path / "1" / "metrics.json"
    before = done.read_bytes(), done.stat().st_mtime_ns

    proc = multirun(tmp_path, *args)
    assert "trial 0 failed in an earlier run of this sweep: run again as a new trial" in proc.stdout
    assert (done.read_bytes(), done.stat().st_mtime_ns) == before  # not trained again
    log = (tmp_path / "2" / "train.log").read_text()
    assert f"sweep job 2: resuming from its own {tmp_path / '2' / 'checkpoints' / 'last.pt'}" in log
    assert f"step {interrupted_at}" in log.split("resumed from", 1)[1].splitlines()[0]
    steps_logged = [
        int(line.split(",")[0]) for line in (tmp_path / "2" / "metrics.csv").read_text().splitlines()[1:]
    ]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == 6  # each step once, to the end

    assert optuna_trials(tmp_path) == [(0, "FAIL"), (1, "COMPLETE"), (2, "COMPLETE"), (3, "COMPLETE")]
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert study.trials[3].params == study.trials[0].params and study.trials[3].user_attrs == {"retry_of": 0}
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert (results.best_params, results.best_value) == (study.best_params, study.best_value)
    best = study.best_trial.number
    summary = (tmp_path / "summary.md").read_text()
    assert "4 jobs: 3 success, 1 diverged" in summary
    assert summary.split("|---", 1)[1].splitlines()[1].startswith(f"| {best} | success | COMPLETE |")
    assert read_csv(tmp_path)[0]["job"] == str(best) and f"best: job {best}" in proc.stdout
