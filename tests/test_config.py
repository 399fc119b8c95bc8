"""Every option of every config group composes and instantiates (no network, tiny data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONF, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lab.checkpoint import Checkpointer
from lab.config import validate
from lab.loggers import build_loggers
from lab.optim import build_optimizer, build_schedulers


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options_and_defaults_compose(tmp_path: Path) -> None:
    cfg = compose_config(output_dir=tmp_path)
    validate(cfg)
    for group in ("dataset", "model", "optimizer", "scheduler", "logger", "checkpoint", "trainer", "paths"):
        assert options(group), group
    assert cfg.dataset.name == "digits" and cfg.model._target_.endswith("SimpleCNN")
    assert cfg.model.num_classes == cfg.dataset.num_classes  # flows by interpolation, never typed twice
    assert cfg.model.in_channels == cfg.dataset.channels


def own_models() -> list[str]:
    """Model options that are not torchvision backbones (those are built in tests/test_backbone.py)."""
    return [o for o in options("model") if "backbone/" not in (CONF / "model" / f"{o}.yaml").read_text()]


@pytest.mark.parametrize("option", own_models())
def test_model_options_build_and_forward(option: str, tmp_path: Path) -> None:
    cfg = compose_config([f"model={option}"], tmp_path)
    model = instantiate(cfg.model)
    x = torch.zeros(2, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    assert model(x).shape == (2, cfg.dataset.num_classes)
    assert model.head(model.features(x)).shape == (2, cfg.dataset.num_classes)


@pytest.mark.parametrize("optimizer", options("optimizer"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_optimizer_and_scheduler_options(optimizer: str, scheduler: str, tmp_path: Path) -> None:
    cfg = compose_config([f"optimizer={optimizer}", f"scheduler={scheduler}"], tmp_path)
    validate(cfg)
    model = instantiate(cfg.model)
    opt = build_optimizer(cfg.optimizer, model)
    assert type(opt).__name__ == cfg.optimizer._target_.rsplit(".", 1)[-1]
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.lr)
    scheds = build_schedulers(cfg.scheduler, opt, total_steps=5 * cfg.trainer.max_epochs)
    assert (scheds.main is None) == (cfg.scheduler._target_ is None)
    for step in range(1, 6):  # one epoch of steps, then the epoch end
        opt.step()
        scheds.step_after_optimizer(step)
    scheds.step_after_epoch({"val/acc": 0.5, "val/loss": 1.0})
    scheds.load_state_dict(scheds.state_dict())


def test_onecycle_total_steps_filled_in(tmp_path: Path) -> None:
    cfg = compose_config(["scheduler=onecycle", "trainer.max_epochs=3"], tmp_path)
    opt = build_optimizer(cfg.optimizer, instantiate(cfg.model))
    scheds = build_schedulers(cfg.scheduler, opt, total_steps=21)
    assert scheds.main.total_steps == 21 and scheds.interval == "step"


def test_linear_warmup_ramps_the_learning_rate(tmp_path: Path) -> None:
    cfg = compose_config(["scheduler.warmup_steps=4", "optimizer.lr=0.4"], tmp_path)
    opt = build_optimizer(cfg.optimizer, instantiate(cfg.model))
    scheds = build_schedulers(cfg.scheduler, opt, total_steps=10)
    seen = [opt.param_groups[0]["lr"]]
    for step in range(1, 7):
        opt.step()
        scheds.step_after_optimizer(step)
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4])


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options_instantiate(option: str, tmp_path: Path) -> None:
    cfg = compose_config([f"logger={option}"], tmp_path)
    loggers = build_loggers(cfg.get("logger"))
    assert set(loggers.loggers) == set(cfg.get("logger") or {})
    if option == "none":
        assert not loggers


@pytest.mark.parametrize("option", options("checkpoint"))
def test_checkpoint_options_instantiate(option: str, tmp_path: Path) -> None:
    cfg = compose_config([f"checkpoint={option}"], tmp_path)
    checkpointer = Checkpointer(**OmegaConf.to_container(cfg.checkpoint, resolve=True))
    assert checkpointer.enabled == (option != "none")
    assert checkpointer.dirpath == tmp_path / "checkpoints"


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options_validate(option: str, tmp_path: Path) -> None:
    validate(compose_config([f"trainer={option}"], tmp_path))


@pytest.mark.parametrize("option", options("dataset"))
def test_data_options_compose(option: str, tmp_path: Path) -> None:
    overrides = [f"dataset={option}"]
    if option == "image_folder":  # num_classes is counted from dataset.root's class folders
        for name in ("cat", "dog"):
            (tmp_path / "images" / name).mkdir(parents=True)
        overrides.append(f"dataset.root={tmp_path / 'images'}")
    if option == "diabetes":  # a table with a real-valued target
        overrides += ["task=regression", "model=mlp"]
    if option == "wine":  # a table with classes
        overrides += ["model=mlp"]
    cfg = compose_config(overrides, tmp_path)
    validate(cfg)
    if "image_size" in cfg.dataset:
        assert cfg.dataset.num_classes > 1 and len(cfg.dataset.mean) == len(cfg.dataset.std)
    else:
        assert list(cfg.task.input_shape) == [cfg.dataset.num_features]
        assert cfg.model.num_outputs == cfg.dataset.get("num_classes", 1)


def test_experiment_and_debug_override_several_groups(tmp_path: Path) -> None:
    cfg = compose_config(["experiment=example"], tmp_path)
    assert cfg.model._target_.endswith("MLP") and cfg.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.task_name == "example" and "csv" in cfg.logger
    fast = compose_config(["debug=fast"], tmp_path)
    assert fast.trainer.max_epochs == 1 and fast.trainer.limit_train_batches == 2
    assert not Checkpointer(**OmegaConf.to_container(fast.checkpoint, resolve=True)).enabled


def test_run_dirs_of_runs_started_in_the_same_second_differ() -> None:
    import subprocess
    import sys

    from conftest import cli_env
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra_cfg = compose("train", return_hydra_config=True).hydra
    assert OmegaConf.to_container(hydra_cfg.run)["dir"].endswith("_${run_id:}")
    assert OmegaConf.to_container(hydra_cfg.sweep)["dir"].endswith("_${run_id:}")
    code = "import lab.resolvers as r; print(r.run_id())"
    env = {k: v for k, v in cli_env().items() if k != "LAB_RUN_ID"}
    ids = {
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout
        for _ in "ab"
    }
    assert len(ids) == 2 and all(len(i.strip()) == 6 for i in ids)
    pinned = subprocess.run(
        [sys.executable, "-c", code], env={**env, "LAB_RUN_ID": "job7"}, capture_output=True, text=True
    )
    assert pinned.stdout.strip() == "job7"
