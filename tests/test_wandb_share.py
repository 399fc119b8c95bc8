"""W&B: sweeps through Hydra, watch on the module that runs, export artifacts, and no secret in what W&B records.

Offline runs (WANDB_MODE=offline) are read back from their record file. No W&B server is reachable here, so the
sweep is tested with wandb's own sweep-command builder (what `wandb agent` runs), not with a live agent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, cli_env, compose_config, train
from omegaconf import OmegaConf
from test_wandb import offline_runs, read_run, records

from lab.errors import UserError
from lab.loggers.wandb import agent_argv
from lab.train import run

SECRET = "hf_S3cretTokenValue0042"


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run for the secrets and watch tests: every logger (W&B watching the head of a frozen backbone on cached
    features, lab's histograms every step), the export folder as an artifact, two secret overrides."""
    run_dir = tmp_path_factory.mktemp("wandb_share") / "run"
    train(run_dir, *TINY, "logger=many", f"+paths.hf_token={SECRET}", "+paths.db_password=pw-Hunter2-xyz",
              "model=resnet18_frozen", "model.weights=null", "dataset.image_size=32",
              "logger.wandb.watch.log=all", "logger.wandb.watch.log_freq=1", "monitor.histograms.every_n_steps=1",
              f"paths.feature_cache={run_dir.parent / 'cache'}", "export=[state_dict]")  # fmt: skip
    return run_dir


def test_secret_overrides_stay_out_of_every_file_the_run_writes(shared_run: Path) -> None:
    run_dir = shared_run
    [path] = offline_runs(run_dir)
    record = read_run(path)["run"]
    assert "paths.hf_token=***" in record.display_name  # the name still says which overrides were given
    environments = [r.environment for r in records(path) if r.WhichOneof("record_type") == "environment"]
    assert any("+paths.hf_token=***" in e.args for e in environments)  # W&B's record of the command line
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 20 and any(p.suffix == ".wandb" for p in files)
    for p in (
        files
    ):  # the W&B record, its metadata (command line), debug logs, TensorBoard, checkpoints, export ...
        data = p.read_bytes()
        assert SECRET.encode() not in data and b"pw-Hunter2-xyz" not in data, p
    # The tutorials' wandb.save: the (redacted) config file travels with the run.
    [saved] = (run_dir / "wandb").glob("offline-run-*/files/.hydra/config.yaml")
    assert "hf_token: '***'" in saved.read_text()


def test_watch_all_logs_the_head_on_cached_features_and_no_duplicate_histograms(shared_run: Path) -> None:
    [path] = offline_runs(shared_run)
    wandb_run = read_run(path)
    keys = set().union(*wandb_run["history"])
    assert {"parameters/1.weight", "gradients/1.weight", "parameters/1.bias"} <= keys  # the head (Sequential)
    assert not [
        k for k in keys if k.startswith(("weights/", "grads/"))
    ]  # lab's own copies stay in TensorBoard
    # The export/ folder as a model artifact (alias "export").
    exported = [a for a in wandb_run["artifacts"] if a.type == "model" and "export" in list(a.aliases)]
    assert exported and "model.pt" in [e.path for e in exported[0].manifest.contents]


def agent_commands(params: dict) -> list[str]:
    """What `wandb agent` runs for one parameter set: wandb's own builder, macros filled in as the agent does."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    sweep = yaml.safe_load((ROOT / "sweeps" / "wandb.yaml").read_text())
    command = sweep_utils.create_sweep_command(list(sweep["command"]))
    sweep_vars = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars |= {"interpreter": ["python"], "program": [sweep["program"]], "env": ["/usr/bin/env"]}
    out = []
    for chunk in command:
        out += sweep_vars.get(chunk[2:-1], []) if chunk.startswith("${") else [chunk]
    return out


def samples() -> list[dict]:
    """A parameter set from the sweep file itself, plus the traps: None, a comma inside a value."""
    sweep = yaml.safe_load((ROOT / "sweeps" / "wandb.yaml").read_text())
    first = {k: spec["values"][-1] if "values" in spec else spec.get("value", spec.get("min"))
             for k, spec in sweep["parameters"].items()}  # fmt: skip
    traps = {"optimizer": "adamw", "optimizer.lr": 0.003, "trainer.gradient_clip_val": None,
             "logger.wandb.notes": "first try, small lr", "logger.wandb.tags": ["a", "b"]}  # fmt: skip
    return [first, traps]


@pytest.mark.parametrize("params", samples(), ids=["sweep-file", "traps"])
def test_each_wandb_agent_command_composes_and_trains_one_step(
    params: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = agent_commands(params)
    assert argv[:3] == ["/usr/bin/env", "python", "train.py"] and "-m" not in argv
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    overrides = agent_argv(argv[3:])
    cfg = compose_config([*overrides, "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                          "trainer.limit_val_batches=1", "test=false", "trainer.progress_bar=false"], tmp_path)  # fmt: skip
    targets = {"adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW", "sgd": "torch.optim.SGD",
               "cosine": "torch.optim.lr_scheduler.CosineAnnealingLR", "none": None}  # fmt: skip
    for key, value in params.items():
        if key in ("optimizer", "scheduler"):  # a group choice picks the group's file
            assert cfg[key]._target_ == targets[value], key
        elif key != "trainer.max_epochs":  # set to 1 above for this test
            assert OmegaConf.select(cfg, key) == value, key
    monkeypatch.setenv("WANDB_MODE", "disabled")  # a real wandb run object that sends nothing
    run(cfg)
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "checkpoints" / "best.pt").is_file()


def test_agent_traps(monkeypatch: pytest.MonkeyPatch) -> None:
    assert agent_argv(["train.py", "a=None"]) == ["train.py", "a=None"]  # not under an agent: untouched
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    assert agent_argv(["train.py", "a=None", "b=x,y", "c=[1, 2]", "d=it's,here"]) == [
        "train.py", "a=null", "b='x,y'", "c=[1, 2]", "d='it\\'s,here'"]  # fmt: skip
    proc = train(None, "-m", "optimizer.lr=0.1", env=cli_env(WANDB_SWEEP_ID="abc123"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: a W&B sweep agent runs one job per process (-m)"
    )


def test_no_offline_fallback_inside_a_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose_config(["logger=wandb", "debug=fast"], tmp_path)
    with pytest.raises(UserError, match="a W&B sweep run cannot log offline"):
        run(cfg)
