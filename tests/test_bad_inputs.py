"""Bad inputs on the command line: each one exits non-zero with one line naming the key or file, no traceback,
and leaves an earlier run dir exactly as it was.

Every case fails before training. The table runs `train.py` in-process (`conftest.train`: the same `__main__`,
Hydra's own argument parsing and error reporting, the exit code from `SystemExit`, stderr captured); a few cases,
one per place a failure can come from, also run as real processes (forked from this one: their own exit code and
output streams) and must fail the same way. The real command line's start-up is tested in tests/test_train.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import Forked, cli_env, train, train_args


@dataclass(frozen=True)
class Case:
    id: str
    overrides: tuple[str, ...]
    names: str  # the error line must contain this (the bad key or file)
    env: dict[str, str] = field(default_factory=dict)
    says: str = ""  # and this (e.g. the keys the chosen option has)


# `{d}` is the fixture folder, `{good}` the earlier good run.
CASES = [
    Case("unknown_group_option", ("model=nope",), "model"),
    Case("group_added_with_plus", ("+dataset=mnist",), "dataset=<option>, without +"),
    Case("unknown_scheduler_option", ("scheduler=warp",), "scheduler"),
    Case("unknown_key", ("trainer.nope=1",), "trainer.nope"),
    Case("epochs_not_int", ("trainer.max_epochs=abc",), "trainer.max_epochs"),
    Case("epochs_zero", ("trainer.max_epochs=0",), "trainer.max_epochs"),
    Case("epochs_negative", ("trainer.max_epochs=-3",), "trainer.max_epochs"),
    Case("lr_zero", ("optimizer.lr=0",), "optimizer.lr"),
    Case("lr_negative", ("optimizer.lr=-1e-3",), "optimizer.lr"),
    Case("lr_not_number", ("optimizer.lr=fast",), "optimizer.lr"),
    Case("batch_size_zero", ("dataset.batch_size=0",), "dataset.batch_size"),
    Case("batch_size_negative", ("dataset.batch_size=-8",), "dataset.batch_size"),
    Case("val_fraction_zero", ("dataset.val_fraction=0",), "dataset.val_fraction"),
    Case("val_fraction_above_one", ("dataset.val_fraction=1.5",), "dataset.val_fraction"),
    Case("num_workers_negative", ("dataset.num_workers=-1",), "dataset.num_workers"),
    Case("accumulate_zero", ("trainer.accumulate_grad_batches=0",), "trainer.accumulate_grad_batches"),
    Case("limit_batches_negative", ("trainer.limit_train_batches=-1",), "trainer.limit_train_batches"),
    Case("ckpt_missing", ("ckpt_path={d}/missing.pt",), "missing.pt"),
    Case("ckpt_is_a_dir", ("ckpt_path={good}",), "ckpt_path"),
    Case("ckpt_corrupt", ("ckpt_path={d}/corrupt.pt",), "corrupt.pt"),
    Case("ckpt_truncated", ("ckpt_path={d}/truncated.pt",), "truncated.pt"),
    Case("ckpt_empty", ("ckpt_path={d}/empty.pt",), "empty.pt"),
    Case("ckpt_foreign", ("ckpt_path={d}/foreign.pt",), "foreign.pt"),
    Case("ckpt_pickled_object", ("ckpt_path={d}/pickled.pt",), "pickled.pt"),
    Case(
        "ckpt_other_num_classes",
        (
            "ckpt_path={good}/checkpoints/last.pt",
            "dataset.num_classes=12",
            "+dataset.class_names=[0,1,2,3,4,5,6,7,8,9,a,b]",
        ),
        "head.",
    ),
    Case("num_classes_not_the_datasets", ("dataset.num_classes=12",), "dataset.num_classes=10"),
    Case("ckpt_other_model", ("ckpt_path={good}/checkpoints/last.pt", "model=mlp"), "last.pt"),
    Case("evaluate_without_ckpt", ("train=false",), "ckpt_path"),
    Case("nothing_to_do", ("train=false", "test=false"), "train=false"),
    Case("device_unknown", ("trainer.device=tpu",), "trainer.device"),
    Case("precision_unknown", ("trainer.precision=fp8",), "trainer.precision"),
    Case(
        "precision_16_mixed_on_cpu", ("trainer.precision=16-mixed", "trainer.device=cpu"), "trainer.precision"
    ),
    Case("monitor_never_logged", ("checkpoint.monitor=val/f1",), "checkpoint.monitor"),
    # A library's rejection of a config value, and values no type can rule out.
    Case("optimizer_unknown_argument", ("+optimizer.foo=1",), "optimizer.foo"),
    Case("optimizer_value_rejected", ("optimizer=sgd", "optimizer.momentum=-1"), "optimizer"),
    Case("optimizer_betas_rejected", ("+optimizer.betas=[2,3]",), "optimizer"),
    Case("scheduler_wrong_type", ("scheduler=cosine", "scheduler.T_max=abc"), "scheduler.T_max"),
    Case("loss_unknown_argument", ("+task.loss.foo=1",), "task.loss.foo"),
    Case(
        "metric_value_rejected",
        (
            "+task.metrics.f1={{_target_:torchmetrics.classification.MulticlassF1Score,"
            "num_classes:10,average:macroo}}",
        ),
        "task.metrics.f1",
    ),
    Case(
        "own_metric_value_rejected", ("task.metrics.acc_top5.top_k=0",), "task.metrics.acc_top5", says="top_k"
    ),
    Case("lr_nonsense", ("optimizer.lr=100",), "optimizer.lr"),
    Case("labels_outside_num_classes", ("dataset.num_classes=5",), "dataset.num_classes"),
    Case("image_size_zero", ("dataset.image_size=0",), "dataset.image_size"),
    Case("image_size_huge", ("dataset.image_size=100000",), "dataset.image_size"),
    Case(
        "regression_monitor_acc",
        ("task=regression", "dataset=diabetes", "model=mlp", "checkpoint.monitor=val/acc"),
        "checkpoint.monitor",
    ),
    Case("unknown_task", ("task=segmentation",), "task"),
    Case(
        "callback_unknown_argument",
        ("callbacks.early_stopping.patiense=3",),
        "callbacks.early_stopping.patiense",
    ),
    Case("mode_unknown", ("checkpoint.mode=up",), "checkpoint.mode"),
    Case("nan_policy_unknown", ("trainer.nan_policy=ignore",), "trainer.nan_policy"),
    Case("stop_signal_unknown", ("trainer.stop_signals=[SIGFOO]",), "trainer.stop_signals"),
    Case("resume_unknown", ("resume=sometimes",), "resume"),
    Case("output_dir_not_writable", ("hydra.run.dir={d}/a_file/run",), "hydra.run.dir"),
    Case("checkpoint_dir_not_writable", ("checkpoint.dirpath={d}/a_file/ckpts",), "checkpoint.dirpath"),
    Case("dataset_files_missing", ("dataset=mnist", "paths.data_dir={d}/no_data"), "dataset.source.root"),
    Case("torchrun_world_size_zero", (), "WORLD_SIZE", env={"WORLD_SIZE": "0"}),
    # An unknown key lists the keys of the option actually chosen.
    Case("unknown_key_of_chosen_model", ("model=mlp", "model.hiden=32"), "model.hiden", says="hidden"),
    Case(
        "unknown_key_of_chosen_optimizer",
        ("optimizer=sgd", "optimizer.momentun=0.5"),
        "optimizer.momentun",
        says="momentum",
    ),
    # Values a library class only rejects when used: found by the dry run before the first step.
    Case("scheduler_step_size_zero", ("scheduler=step", "scheduler.step_size=0"), "scheduler.step_size"),
    Case("scheduler_t_max_zero", ("scheduler=cosine", "scheduler.T_max=0"), "scheduler.T_max"),
    Case("onecycle_negative_max_lr", ("scheduler=onecycle", "scheduler.max_lr=-1"), "scheduler.max_lr"),
    Case("label_smoothing_above_one", ("task.loss.label_smoothing=2",), "task.loss", says="label_smoothing"),
    Case("loss_without_reduction", ("+task.loss.reduction=none",), "task.loss.reduction"),
    Case("augment_magnitude_out_of_range", ("augment=randaugment", "augment.magnitude=50"), "augment"),
    # lab's own keys and classes: typed schemas, value ranges, arguments checked against the signature.
    Case("warmup_steps_not_int", ("scheduler.warmup_steps=abc",), "scheduler.warmup_steps"),
    Case("layer_decay_above_one", ("optimizer.layer_decay=2",), "optimizer.layer_decay"),
    Case("ema_unknown_argument", ("callbacks=[default,ema]", "+callbacks.ema.foo=1"), "callbacks.ema.foo"),
    Case("logger_unknown_argument", ("+logger.tensorboard.foo=1",), "logger.tensorboard.foo"),
    Case("max_time_five_fields", ("trainer.max_time=1:02:03:04:05",), "trainer.max_time"),
    Case("save_top_k_negative", ("checkpoint.save_top_k=-1",), "checkpoint.save_top_k"),
    Case(
        "monitor_histogram_every_zero",
        ("monitor.histograms.every_n_steps=0",),
        "monitor.histograms.every_n_steps",
    ),
    Case("prefetch_factor_zero", ("dataset.prefetch_factor=0",), "dataset.prefetch_factor"),
    # Keys that span groups.
    Case(
        "early_stopping_monitor_never_logged",
        ("callbacks.early_stopping.monitor=val/f1",),
        "callbacks.early_stopping.monitor",
    ),
    Case("export_format_unknown", ("export=[onnx,tflite]",), "export"),
    Case("output_dir_impossible", ("paths.output_dir=/proc/nope",), "paths.output_dir"),
    Case("torchrun_rank_outside_world", (), "RANK/WORLD_SIZE", env={"WORLD_SIZE": "2", "RANK": "3"}),
    # Own images and torchvision backbones.
    Case(
        "image_folder_missing",
        ("dataset=image_folder", "dataset.root={d}/no_images"),
        "no_images",
    ),
    Case(
        "image_folder_empty",
        ("dataset=image_folder", "dataset.root={d}/images_empty"),
        "images_empty",
    ),
    Case(
        "image_folder_one_class",
        ("dataset=image_folder", "dataset.root={d}/images_one_class"),
        "images_one_class",
    ),
    Case(
        "image_folder_corrupt_image",
        ("dataset=image_folder", "dataset.root={d}/images_corrupt"),
        "broken.png",
    ),
    Case(
        "torchvision_model_unknown",
        ("model=resnet18", "model.name=resnet_nope", "model.weights=null"),
        "model.name",
    ),
    Case(
        "torchvision_weights_unknown",
        ("model=resnet18", "model.weights=NOPE_V9"),
        "model.weights",
    ),
]
if os.geteuid() != 0:  # root may write anywhere: then only the path-under-a-file case above applies
    CASES.append(Case("output_dir_read_only", ("hydra.run.dir={d}/read_only/run",), "hydra.run.dir"))
if not torch.cuda.is_available():  # only meaningful where there is no GPU
    CASES.append(Case("device_cuda_absent", ("trainer.device=cuda",), "trainer.device"))
# Also through a real process: Hydra rejecting an override, a config value our validation refuses, a checkpoint
# refused when loaded, a bad torchrun environment (checked in train.py before Hydra starts).
CLI_CASES = ("unknown_key", "lr_zero", "ckpt_pickled_object", "torchrun_rank_outside_world")


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def write_png(path: Path, color: int) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), (color, color, color)).save(path)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Each case's outcome: `results[id]` in-process, `results["cli", id]` as a real process."""
    d = tmp_path_factory.mktemp("bad_inputs")
    good = d / "good"
    train(good, "debug=fast", "checkpoint=default")
    last = good / "checkpoints" / "last.pt"
    (d / "corrupt.pt").write_bytes(os.urandom(4096))
    (d / "truncated.pt").write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (d / "empty.pt").write_bytes(b"")
    torch.save({"weight": torch.zeros(3)}, d / "foreign.pt")  # a plain tensor dict, not a training checkpoint
    # A checkpoint that smuggles in an arbitrary Python object (could run code when unpickled).
    torch.save(
        {"model": {}, "epoch": 0, "global_step": 0, "payload": argparse.Namespace(x=1)}, d / "pickled.pt"
    )
    (d / "a_file").write_text("a regular file where a directory is needed\n")
    (d / "no_data").mkdir()
    (d / "read_only").mkdir(mode=0o500)
    (d / "images_empty").mkdir()
    (d / "images_one_class" / "cat").mkdir(parents=True)
    for i in range(3):
        write_png(d / "images_one_class" / "cat" / f"{i}.png", 40 * i)
    for name in ("cat", "dog"):
        (d / "images_corrupt" / name).mkdir(parents=True)
        for i in range(3):
            write_png(d / "images_corrupt" / name / f"{i}.png", 40 * i)
    (d / "images_corrupt" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    before = snapshot(good)

    def overrides(case: Case) -> list[str]:
        return [o.format(d=d, good=good) for o in case.overrides]

    procs = {
        case.id: train(d / "runs" / case.id, *overrides(case), check=False, env=cli_env(**case.env))
        for case in CASES
    }
    for case in (c for c in CASES if c.id in CLI_CASES):
        args = train_args(d / "cli" / case.id, tuple(overrides(case)))
        forked = Forked("train.py", args, env=cli_env(**case.env))
        stdout, stderr = forked.communicate(timeout=120)
        procs["cli", case.id] = subprocess.CompletedProcess(forked.args, forked.returncode, stdout, stderr)
    assert snapshot(good) == before, "a failed run modified an earlier run dir"
    return procs | {"dir": d}


def test_the_table_has_at_least_25_cases() -> None:
    assert len(CASES) >= 25


def assert_fails_cleanly(proc: subprocess.CompletedProcess, case: Case) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1, proc.stderr[-2000:]  # exactly one line of ours, and no Hydra message block
    assert case.names in ours[0] and case.says in ours[0] and ours[0].count("error:") == 1, ours[0]
    assert "Error executing job" not in output and "Error in call to target" not in output, output[-2000:]


def assert_nothing_trained(run_dir: Path) -> None:
    """No epoch ran: no checkpoint, no metrics beyond the failure record, no logged step."""
    assert not list(run_dir.glob("checkpoints/*"))
    metrics = run_dir / "metrics.json"
    assert not metrics.exists() or json.loads(metrics.read_text())["status"] == "failed"
    assert not list(run_dir.glob("tensorboard/events.*")) or not any(
        p.stat().st_size > 200 for p in run_dir.glob("tensorboard/events.*")
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_fails_cleanly(case: Case, results: dict) -> None:
    assert_fails_cleanly(results[case.id], case)
    assert_nothing_trained(results["dir"] / "runs" / case.id)


@pytest.mark.parametrize("case_id", CLI_CASES)
def test_a_real_process_fails_the_same_way(case_id: str, results: dict) -> None:
    case = next(c for c in CASES if c.id == case_id)
    proc, in_process = results["cli", case_id], results[case_id]
    assert_fails_cleanly(proc, case)
    assert proc.returncode == in_process.returncode
    assert [line for line in proc.stderr.splitlines() if case.names in line] == [
        line.replace(f"/runs/{case_id}", f"/cli/{case_id}")
        for line in in_process.stderr.splitlines()
        if case.names in line
    ]
