"""The W&B logger through `train.py` (in-process) in offline mode, read back from the offline run's record log.

wandb 0.31 has no Python reader for offline runs any more, so `records()` parses the file format itself: a 7-byte
file header starting `:W&B`, then 32 KiB blocks of chunks with a `<IHB` (crc, length, type) header; type 1 is a
whole record, 2/3/4 the first/middle/last piece of one; each record is a `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY, cli_env, train

BLOCK, HEADER = 32 * 1024, 7


def records(path: Path) -> Iterator:
    # Imported here: at the top, each pytest worker would import wandb when it collects this file.
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pieces = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        if kind == 0:  # zero padding up to the end of the block
            pos += left - HEADER
            continue
        pieces.append(data[pos : pos + length])
        pos += length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(b"".join(pieces))
            pieces = []


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def items(updates) -> dict:
    """History/summary/config items → `{key: value}`; nested keys (media, summary aggregates) → `{key: {sub: value}}`."""
    out: dict = {}
    for item in updates:
        path = [item.key] if item.key else list(item.nested_key)
        value = json.loads(item.value_json)
        if len(path) == 1:
            out[path[0]] = value
        else:
            out.setdefault(path[0], {})[".".join(path[1:])] = value
    return out


def read_run(path: Path) -> dict:
    """The parts of an offline run the tests look at: run info, config, history rows, summary, artifacts, metrics."""
    out = {"config": {}, "history": [], "summary": {}, "artifacts": [], "metrics": {}}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":  # the config passed to wandb.init arrives with the run
            out["run"] = record.run
            out["config"].update(items(record.run.config.update))
        elif kind == "config":
            out["config"].update(items(record.config.update))
        elif kind == "history":
            out["history"].append(items(record.history.item))
        elif kind == "summary":
            out["summary"].update(items(record.summary.update))
        elif kind == "artifact":
            out["artifacts"].append(record.artifact)
        elif kind == "metric":
            out["metrics"][record.metric.name] = record.metric
    return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A W&B run of two epochs, read by the test of what it records and resumed by the test of resuming."""
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    train(run_dir, *TINY, "logger=wandb", "logger.wandb.tags=[baseline,tiny]", "logger.wandb.notes=hello",
              "logger.wandb.log_checkpoints=true")  # fmt: skip
    return run_dir


def test_offline_run_has_config_history_summary_and_checkpoint(first_run: Path) -> None:
    [path] = offline_runs(first_run)  # the run directory lives inside the Hydra run dir
    run = read_run(path)
    assert run["run"].project == "lab" and list(run["run"].tags) == ["baseline", "tiny"]
    assert run["run"].notes == "hello"
    assert run["run"].display_name.startswith("train:") and "logger=wandb" in run["run"].display_name
    # The resolved config, as nested values.
    assert run["config"]["trainer"]["max_epochs"] == 2 and run["config"]["dataset"]["name"] == "digits"
    assert run["config"]["logger"]["wandb"]["tags"] == ["baseline", "tiny"]
    # History: the scalars at the logged steps, media too.
    rows = run["history"]
    keys = set().union(*rows)
    assert {"train/loss", "train/acc", "train/grad_norm", "lr", "val/loss", "val/acc", "epoch_time"} <= keys
    assert {
        "train/images",
        "final/val/pr_curve_table",
        "final/test/pr_curve_table",
        "config",
        "model_summary",
    } <= keys
    assert rows[0]["train/images"]["count"] == 32
    steps = [row["_step"] for row in rows if "train/loss" in row]
    assert steps == [2, 4, 6, 8]
    # Summary: best and final values (define_metric), final metrics from log_hparams.
    assert {"final/val/acc", "final/test/acc"} <= set(run["summary"])
    assert "val/acc" in run["metrics"] and run["metrics"]["val/acc"].summary.max
    best = run["summary"]["val/acc"]
    assert best["max"] == max(row["val/acc"] for row in rows if "val/acc" in row)
    # best.pt as a model artifact.
    models = [a for a in run["artifacts"] if a.type == "model"]
    assert models and "best.pt" in [entry.path for a in models for entry in a.manifest.contents]


def test_log_checkpoints_all_uploads_every_epochs_last_pt(tmp_outputs: Path) -> None:
    run_dir = tmp_outputs / "all"
    # Synchronous writes: each epoch's last.pt is on disk when the next epoch ends, so the count is exact.
    # Three short epochs; no media or test split (not what is counted).
    train(run_dir, *TINY, "trainer.max_epochs=3", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
              "test=false", "monitor=none", "logger=wandb", "logger.wandb.log_checkpoints=all",
              "checkpoint.async_write=false")  # fmt: skip
    [path] = offline_runs(run_dir)
    models = [a for a in read_run(path)["artifacts"] if a.type == "model"]
    files = [entry.path for a in models for entry in a.manifest.contents]
    assert files.count("last.pt") == 3 and files.count("best.pt") == 1
    assert len({a.digest for a in models}) == len(models)  # each upload is a new version


def test_no_api_key_no_mode_goes_offline_without_prompting(tmp_path: Path) -> None:
    """No WANDB_API_KEY, no WANDB_MODE, HOME without ~/.netrc, stdin closed: offline, one line saying how to sync."""
    env = {k: v for k, v in cli_env().items() if k not in ("WANDB_MODE", "NETRC")}
    env["HOME"] = str(tmp_path / "home")
    run_dir = tmp_path / "run"
    proc = train(run_dir, "debug=fast", "logger=wandb", env=env)
    output = proc.stdout + proc.stderr  # the log goes to the console (stdout) and train.log
    lines = [line for line in output.splitlines() if "wandb sync" in line and "offline" in line]
    assert len(lines) == 1 and "no W&B API key" in lines[0], output[-3000:]
    assert "no W&B API key" in (run_dir / "train.log").read_text()
    [path] = offline_runs(run_dir)
    assert "train/loss" in set().union(*read_run(path)["history"])


def test_key_but_no_network_falls_back_to_offline(tmp_path: Path) -> None:
    """A key is set but the W&B server cannot be reached (simulated: a closed local port instead of the internet)."""
    env = {k: v for k, v in cli_env().items() if k != "WANDB_MODE"}
    env |= {"HOME": str(tmp_path / "home"), "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    run_dir = tmp_path / "run"
    train(run_dir, "debug=fast", "logger=wandb", "logger.wandb.init_timeout=5", env=env)
    log = (run_dir / "train.log").read_text()
    assert "W&B online start failed" in log and "wandb sync" in log
    [path] = offline_runs(run_dir)
    assert "train/loss" in set().union(*read_run(path)["history"])


def test_resume_continues_the_same_wandb_run(first_run: Path, tmp_outputs: Path) -> None:
    first, second = first_run, tmp_outputs / "second"
    [path] = offline_runs(first)
    started = read_run(path)
    run_id = started["run"].run_id
    assert not started["run"].resume and "lab/resumed_from_step" not in started["summary"]
    state = torch.load(first / "checkpoints" / "last.pt", weights_only=True)
    assert state["loggers"] == {"wandb": {"id": run_id}}

    train(
        second,
        *TINY,
        "trainer.max_epochs=3",
        "logger=wandb",
        f"ckpt_path={first / 'checkpoints' / 'last.pt'}",
    )
    [path] = offline_runs(second)
    resumed = read_run(path)
    assert resumed["run"].run_id == run_id
    # Offline, W&B's `resumed` is never set (the server sets it); its `resume` and lab's entry say so.
    assert resumed["run"].resume and resumed["summary"]["lab/resumed_from_step"] == state["global_step"] == 8
    assert [row["_step"] for row in resumed["history"] if "train/loss" in row] == [10, 12]


def test_each_multirun_job_is_its_own_run_grouped_by_sweep(tmp_outputs: Path) -> None:
    sweep_dir = tmp_outputs / "sweep"
    train(
        None,
        "hydra.mode=MULTIRUN",
        f"hydra.sweep.dir={sweep_dir}",
        "debug=fast",
        "logger=wandb",
        "optimizer.lr=0.001,0.01",
    )
    runs = [read_run(path)["run"] for job in ("0", "1") for path in offline_runs(sweep_dir / job)]
    assert len(runs) == 2 and runs[0].run_id != runs[1].run_id
    assert runs[0].run_group == runs[1].run_group == sweep_dir.name
    assert "optimizer.lr=0.01" in runs[1].display_name


def test_unknown_mode_is_a_one_line_error(tmp_outputs: Path) -> None:
    proc = train(
        tmp_outputs / "bad", "debug=fast", "logger=wandb", "logger.wandb.mode=sometimes", check=False
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: must be one of online, offline, disabled, got 'sometimes' (logger.wandb.mode)")
    )
    assert "Traceback" not in proc.stderr
