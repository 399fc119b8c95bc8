"""Crash safety: SIGKILL at random moments, resume, and get the uninterrupted run bit for bit. The killed runs are
real processes forked from the test process (`conftest.Forked`), as is the SIGTERM test's (train.py's real CLI
process is tested in test_train.py).

Also: SIGTERM stops cleanly (last.pt, loggers closed, exit 143), resume continues the epoch count, `resume=auto`.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import Forked, cli_env, forked_train, train

from lab import checkpoint as ckpt

# Deterministic CPU training with a checkpoint every 2 steps (16 batches an epoch, 48 steps), a scheduler,
# dropout (simple_cnn) and early-stopping state, so every piece of state has to survive the kills.
ARGS = [
    "trainer.deterministic=true",
    "trainer.device=cpu",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=16",
    "trainer.log_every_n_steps=3",
    "callbacks.early_stopping.patience=5",
    "checkpoint.every_n_steps=2",
    "scheduler=cosine",
    "scheduler.warmup_steps=10",
    "logger=csv",
]
TIMING_COLUMNS = {"train/samples_per_sec", "epoch_time"}


def popen_train(run_dir: Path, *overrides: str) -> Forked:
    """A real process to kill: a fork of this one (its imports already done), running train.py."""
    return forked_train(run_dir, *overrides)


def file_id(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def wait_for_new_file(
    proc: subprocess.Popen, path: Path, before: tuple[int, int] | None, timeout: float = 120
):
    deadline = time.monotonic() + timeout
    while proc.poll() is None and file_id(path) == before and time.monotonic() < deadline:
        time.sleep(0.005)


def assert_checkpoints_readable(run_dir: Path) -> None:
    for path in (run_dir / "checkpoints").glob("*.pt"):
        state = ckpt.load(path)  # raises on a truncated or partial file
        assert all(torch.isfinite(v).all() for v in state["model"].values()), path


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def epoch_lines(log: Path) -> dict[str, str]:
    """The last `epoch k/N  train/loss=...` line of each epoch (a resumed run appends to train.log)."""
    lines = {}
    for line in log.read_text().splitlines():
        if match := re.search(r"epoch (\d+/\d+)  (.*)$", line):
            lines[match[1]] = match[2]
    return lines


def assert_same_state(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, value in a["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(
                torch.as_tensor(tensor), torch.as_tensor(b["optimizer"]["state"][key][name])
            ), name
    assert a["scheduler"] == b["scheduler"]
    assert a["monitor"] == b["monitor"] and same(a["callbacks"], b["callbacks"])


def same(a, b) -> bool:
    """Equal plain values, tensors equal bit for bit (e.g. the EMA weights in a callback's state)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files the variants' arguments name: a local resnet18 weights file (no download here), a feature cache."""
    import torchvision

    folder = tmp_path_factory.mktemp("shared")
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model("resnet18", weights=None).state_dict(), folder / "resnet18.pth")
    return {"weights": folder / "resnet18.pth", "cache": folder / "cache"}


def variant(loader: str, shared: dict[str, Path]) -> list[str]:
    return [arg.format(**shared) for arg in LOADERS[loader]]


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, shared: dict[str, Path]):
    """The uninterrupted run for a data loader variant, trained once per module."""
    done: dict[str, Path] = {}

    def get(loader: str) -> Path:
        if loader not in done:
            run_dir = tmp_path_factory.mktemp("reference") / loader
            train(run_dir, *ARGS, *variant(loader, shared))
            done[loader] = run_dir
        return done[loader]

    return get


@pytest.fixture(scope="module")
def reference(references) -> Path:
    return references("in_memory")


# The in-memory fast path and a classic DataLoader (DistributedSampler, skipped batches on resume); a frozen
# backbone from a weights file, whose lean checkpoints hold the head and the backbone's fingerprint only; and the
# training recipes (docs/recipes.md) together: EMA weights, MixUp/CutMix, label smoothing, validation twice an
# epoch, parameter groups, augment presets.
RECIPES = ["callbacks=[default,ema]", "callbacks.ema.decay=0.9", "mix=mixup_cutmix", "task.loss.label_smoothing=0.1",
           "trainer.val_check_interval=0.5", "optimizer=adamw", "optimizer.no_weight_decay=true",
           "optimizer.layer_decay=0.8", "augment=trivial"]  # fmt: skip
LOADERS = {
    "in_memory": [],
    "dataloader": ["dataset.in_memory=false"],
    "lean": ["model=resnet18_frozen", "model.weights_path={weights}", "dataset.image_size=16",
             "paths.feature_cache={cache}"],
    "recipes": RECIPES,
}  # fmt: skip
KILLS = {"in_memory": 4, "dataloader": 2, "lean": 2, "recipes": 2}


@pytest.mark.slow
@pytest.mark.parametrize("loader", list(LOADERS))
def test_sigkill_at_random_points_then_resume_is_bit_identical(
    loader: str, references, shared: dict[str, Path], tmp_path: Path
) -> None:
    reference = references(loader)
    rng = random.Random(8)
    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.pt"
    kills, finished = 0, False
    for _ in range(12):
        resume = [f"ckpt_path={last}"] if last.is_file() else []
        proc = popen_train(run_dir, *ARGS, *variant(loader, shared), *resume)
        if kills < KILLS[loader]:
            # Let this process write at least one checkpoint of its own, then kill it at a random moment:
            # during a step, a validation or a checkpoint write.
            wait_for_new_file(proc, last, file_id(last))
            time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is None and kills < KILLS[loader]:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            kills += 1
            assert_checkpoints_readable(run_dir)
            continue
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        finished = True
        break
    assert finished and kills >= KILLS[loader] - 1, (finished, kills)
    assert not list((run_dir / "checkpoints").glob(".*tmp*")), "stale temp files are cleaned up on resume"
    if loader == "lean":
        assert ckpt.load(last)["frozen"]["weights_path"] == str(shared["weights"])
        assert not [k for k in ckpt.load(last)["model"] if k.startswith("features.")]

    assert_same_state(ckpt.load(last), ckpt.load(reference / "checkpoints" / "last.pt"))
    assert_same_state(
        ckpt.load(run_dir / "checkpoints" / "best.pt"), ckpt.load(reference / "checkpoints" / "best.pt")
    )
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    for key in ("val/acc", "val/loss", "test/acc", "test/loss", "best", "epochs", "global_step"):
        assert ours[key] == theirs[key], key
    # Train metrics of resumed epochs and logging windows are exact too (accumulators are checkpointed).
    assert epoch_lines(run_dir / "train.log") == epoch_lines(reference / "train.log")
    assert csv_rows(run_dir / "metrics.csv") == csv_rows(reference / "metrics.csv")


def test_resume_continues_the_epoch_count_and_reproduces_the_metrics(reference: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    train(first, *ARGS, "trainer.max_epochs=2", "scheduler.T_max=3")
    second = tmp_path / "second"
    train(second, *ARGS, f"ckpt_path={first / 'checkpoints' / 'last.pt'}")
    assert "resumed from" in (second / "train.log").read_text()
    assert list(epoch_lines(second / "train.log")) == ["3/3"]  # only the third epoch ran
    assert_same_state(
        ckpt.load(second / "checkpoints" / "last.pt"), ckpt.load(reference / "checkpoints" / "last.pt")
    )
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (second, reference))
    for key in ("val/acc", "val/loss", "test/acc", "test/loss", "epochs"):
        assert ours[key] == theirs[key], key


def test_sigterm_saves_last_closes_loggers_and_exits_143(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    proc = popen_train(run_dir, "trainer.max_epochs=200", "trainer.log_every_n_steps=1",
                       "checkpoint.every_n_steps=5")  # fmt: skip
    wait_for_new_file(proc, last, None)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    state = ckpt.load(last)
    log = (run_dir / "train.log").read_text()
    assert "SIGTERM received" in log and "exiting with code 143" in log
    assert "loggers closed (interrupted)" in log
    # TensorBoard buffers events for 30 s (flush_secs): the last step being on disk shows close() flushed them.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert events.Scalars("train/loss")[-1].step == state["global_step"] > 0
    # ... and the run continues from there.
    train(tmp_path / "resumed", f"ckpt_path={last}", f"trainer.max_epochs={state['epoch'] + 1}")
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["epochs"] == state["epoch"] + 1


def test_resume_auto_picks_the_newest_last_pt_of_the_task(tmp_path: Path) -> None:
    log_dir = tmp_path / "outputs"
    common = ["debug=fast", "checkpoint=default", f"paths.log_dir={log_dir}", "task_name=job"]
    train(None, *common, "resume=auto")  # nothing to resume yet: starts fresh
    (old,) = (log_dir / "job" / "runs").iterdir()
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    time.sleep(0.05)
    os.utime(old / "checkpoints" / "last.pt")
    train(None, *common, "resume=auto", "trainer.max_epochs=2", env=cli_env(LAB_RUN_ID="second"))
    new = next(p for p in (log_dir / "job" / "runs").iterdir() if p != old)
    assert (
        f"resume=auto: resuming from {old / 'checkpoints' / 'last.pt'}, the newest"
        in (new / "train.log").read_text()
    )
    assert ckpt.load(new / "checkpoints" / "last.pt")["epoch"] == 2
    assert {
        p: p.read_bytes() for p in old.rglob("*") if p.is_file()
    } == before  # the old run dir is untouched


def test_one_process_per_run_folder_and_resume_auto_continues_that_folder(tmp_path: Path) -> None:
    """The real CLI: while run A trains, a second `resume=auto hydra.run.dir=A` stops at once with one line naming
    the running pid and changes nothing in A. After A is killed (-9, the OS drops its lock) and a newer run B
    exists, `resume=auto hydra.run.dir=A` continues A from A's own last.pt, not B's, and every logger holds each
    step once, the values at the resume step included (TensorBoard read back)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = tmp_path / "outputs" / "train" / "runs"
    a, b = runs / "a", runs / "b"
    log_dir = f"paths.log_dir={tmp_path / 'outputs'}"
    common = [log_dir, "trainer.log_every_n_steps=1", "logger=many", "logger.wandb.mode=offline"]
    proc = popen_train(a, *common, "trainer.max_epochs=200", "checkpoint.every_n_steps=5")
    wait_for_new_file(proc, a / "checkpoints" / "last.pt", None)
    assert proc.poll() is None, proc.communicate()
    hydra_files = {p: p.read_bytes() for p in (a / ".hydra").iterdir()}
    started = time.monotonic()
    second = train(a, *common, "resume=auto", check=False)
    assert second.returncode == 2 and time.monotonic() - started < 30
    assert second.stderr.strip().splitlines() == [
        f"error: another process (pid {proc.pid} on {os.uname().nodename}) is running in this run folder ({a}): "
        "wait for it to end or stop it, or give this run another hydra.run.dir"
    ]
    assert {p: p.read_bytes() for p in (a / ".hydra").iterdir()} == hydra_files
    proc.kill()
    proc.communicate(timeout=60)
    step = ckpt.load(a / "checkpoints" / "last.pt")["global_step"]
    # A newer run, another one (whose loggers are not under test).
    train(b, log_dir, "debug=fast", "checkpoint=default", "trainer.max_epochs=1", "logger=none")

    resumed = train(
        a,
        *common,
        "resume=auto",
        f"trainer.max_epochs={ckpt.load(a / 'checkpoints' / 'last.pt')['epoch'] + 1}",
    )
    last = a / "checkpoints" / "last.pt"
    assert f"resume=auto: continuing this run folder from its own {last}" in (a / "train.log").read_text()
    assert resumed.returncode == 0 and str(b) not in (a / "train.log").read_text()
    steps = [int(row["step"]) for row in csv_rows(a / "metrics.csv")]
    assert steps == sorted(set(steps)) and step in steps
    events = EventAccumulator(str(a / "tensorboard")).Reload()
    for tag in ("train/loss", "lr"):
        logged = [e.step for e in events.Scalars(tag)]
        assert logged == sorted(set(logged)) and step in logged, tag


def test_resumed_into_a_new_folder_reports_what_the_uninterrupted_run_reports(tmp_path: Path) -> None:
    """Killed (-9) after its best epoch and resumed with ckpt_path into a new run folder, a run evaluates, reports
    and would export the same best weights as the uninterrupted run: the earlier best.pt is carried over.
    `checkpoint.mode=min` on val/acc makes an early epoch the best one, so the last weights differ from it."""
    args = [*ARGS, "checkpoint.mode=min"]
    reference = tmp_path / "reference"
    train(reference, *args)
    best_epoch = ckpt.load(reference / "checkpoints" / "best.pt")["epoch"]
    assert best_epoch < ckpt.load(reference / "checkpoints" / "last.pt")["epoch"]

    killed = tmp_path / "killed"
    best, last = killed / "checkpoints" / "best.pt", killed / "checkpoints" / "last.pt"
    proc = popen_train(killed, *args)
    wait_for_new_file(proc, best, None)
    wait_for_new_file(proc, last, file_id(last))  # a checkpoint after the best epoch's
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert ckpt.load(last)["epoch"] >= best_epoch

    resumed = tmp_path / "resumed"
    train(resumed, *args, f"ckpt_path={last}")
    assert (
        f"resume: carried {best} over to {resumed / 'checkpoints' / 'best.pt'}"
        in (resumed / "train.log").read_text()
    )
    assert_same_state(
        ckpt.load(resumed / "checkpoints" / "best.pt"), ckpt.load(reference / "checkpoints" / "best.pt")
    )
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (resumed, reference))
    for key in ("val/acc", "val/loss", "test/acc", "test/loss", "best", "epochs", "global_step"):
        assert ours[key] == theirs[key], key


# The recipes that keep state across a resume, on a short run: EMA weights, validation twice an epoch, MixUp and
# gradient accumulation (8 batches, 4 optimizer steps an epoch, validated after step 2 and at the epoch's end; two
# epochs, two val and test batches). `checkpoint.mode=min` on val/acc makes an early validation the best one, so
# the last weights differ from it.
RECIPES_RESUMED = [*ARGS, "trainer.max_epochs=2", "trainer.limit_train_batches=8", "trainer.limit_val_batches=2",
                   "trainer.limit_test_batches=2", "checkpoint.every_n_steps=1", "checkpoint.mode=min",
                   "callbacks=[default,ema]", "callbacks.ema.decay=0.9", "mix=mixup", "trainer.val_check_interval=0.5",
                   "trainer.accumulate_grad_batches=2"]  # fmt: skip


@pytest.fixture(scope="module")
def recipes_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("recipes") / "reference"
    train(run_dir, *RECIPES_RESUMED)
    return run_dir


def final_numbers(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        k: metrics[k]
        for k in ("val/acc", "val/loss", "test/acc", "test/loss", "best", "epochs", "global_step")
    }


def test_resumed_with_recipes_into_a_new_folder_reports_what_the_uninterrupted_run_reports(
    recipes_reference: Path, tmp_path: Path
) -> None:
    """EMA, two validations an epoch, MixUp and accumulation: killed (-9) after its best validation and resumed
    with ckpt_path into a new folder, the run ends with the uninterrupted run's final numbers, exactly."""
    best_step = ckpt.load(recipes_reference / "checkpoints" / "best.pt")["global_step"]
    assert best_step < ckpt.load(recipes_reference / "checkpoints" / "last.pt")["global_step"]

    killed = tmp_path / "killed"
    best, last = killed / "checkpoints" / "best.pt", killed / "checkpoints" / "last.pt"
    proc = popen_train(killed, *RECIPES_RESUMED)
    while proc.poll() is None and not (last.is_file() and ckpt.load(last)["global_step"] > best_step):
        wait_for_new_file(proc, last, file_id(last))
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert ckpt.load(best)["global_step"] == best_step

    resumed = tmp_path / "resumed"
    train(resumed, *RECIPES_RESUMED, f"ckpt_path={last}")
    assert "resumed from" in (resumed / "train.log").read_text()
    assert final_numbers(resumed) == final_numbers(recipes_reference)
    assert_same_state(
        ckpt.load(resumed / "checkpoints" / "best.pt"),
        ckpt.load(recipes_reference / "checkpoints" / "best.pt"),
    )


def test_stop_signal_on_a_step_with_a_validation_due_validates_before_stopping(
    recipes_reference: Path, tmp_path: Path
) -> None:
    """SIGTERM during optimizer step 6, after which epoch 2's mid-epoch validation is due: the run validates, then
    writes last.pt and exits 143; resumed in place it has the uninterrupted run's validations and best.pt."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = [0]

    def sigterm_at_step_6(optimizer, args, kwargs) -> None:
        steps[0] += 1
        if steps[0] == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    run_dir = tmp_path / "run"
    hook = register_optimizer_step_post_hook(sigterm_at_step_6)
    try:
        proc = train(run_dir, *RECIPES_RESUMED, check=False)
    finally:
        hook.remove()
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert ckpt.load(run_dir / "checkpoints" / "last.pt")["global_step"] == 6

    train(run_dir, *RECIPES_RESUMED, "resume=auto")
    assert "resume=auto: continuing this run folder" in (run_dir / "train.log").read_text()

    def validations(path: Path) -> list[dict[str, str]]:
        return [row for row in csv_rows(path) if row.get("val/acc")]

    assert validations(run_dir / "metrics.csv") == validations(recipes_reference / "metrics.csv")
    assert_same_state(
        ckpt.load(run_dir / "checkpoints" / "best.pt"),
        ckpt.load(recipes_reference / "checkpoints" / "best.pt"),
    )
