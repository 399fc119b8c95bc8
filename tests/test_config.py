"""Every option of every config group composes and instantiates (no network, tiny data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONF, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lab.checkpoint import Checkpointer
from lab.choices import preferred_overrides
from lab.config import validate
from lab.errors import UserError
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


def compose_in(conf: Path, overrides: list[str], output_dir: Path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides])


def check_dataset_option(conf: Path, option: str, tmp_path: Path) -> None:
    """`python train.py dataset=<option>` composes, brings a model and task that work with it, and resolves.

    Nothing here knows an option by name: a dataset that reads files names them in `dataset.root` (a folder of
    class folders) or `dataset.path` + `dataset.target` (a CSV file); those left null get a tiny stand-in."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    overrides = [f"dataset={option}"]
    overrides += preferred_overrides(overrides, conf)
    cfg = compose_in(conf, overrides, tmp_path)
    if "root" in cfg.dataset and cfg.dataset.root is None:
        for name in ("cat", "dog"):
            (tmp_path / "images" / name).mkdir(parents=True, exist_ok=True)
        overrides.append(f"dataset.root={tmp_path / 'images'}")
    if "path" in cfg.dataset and cfg.dataset.path is None:
        (tmp_path / "table.csv").write_text("a,b,label\n1,2,x\n3,4,y\n5,6,x\n7,8,y\n")
        overrides += [f"dataset.path={tmp_path / 'table.csv'}", "dataset.target=label"]
    cfg = compose_in(conf, overrides, tmp_path)
    validate(cfg)  # with lab.choices.check_choices: the model and task work with this dataset
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved["task"]["input_shape"] == resolved["dataset"]["input_shape"]
    if "image_size" in cfg.dataset:
        assert len(cfg.dataset.mean) == len(cfg.dataset.std)


def check_model_option(conf: Path, option: str, tmp_path: Path) -> None:
    """`model=<option>` on the default dataset composes and validates, or is refused in one line naming both."""
    cfg = compose_in(conf, [f"model={option}", "model.weights=null"] if "backbone/" in (
        conf / "model" / f"{option}.yaml").read_text() else [f"model={option}"], tmp_path)  # fmt: skip
    try:
        validate(cfg)
    except UserError as e:
        assert "model" in e.where and "dataset" in e.where, e.line()


@pytest.mark.parametrize("option", options("dataset"))
def test_data_options_compose(option: str, tmp_path: Path) -> None:
    check_dataset_option(CONF, option, tmp_path)


USER_DATASET = """\
defaults: [digits, _self_]
source: {_target_: mypackage.data.Shapes, root: "${paths.data_dir}"}
name: shapes
num_classes: 4
channels: 1
image_size: 32
mean: [0.5]
std: [0.25]
"""
USER_TABLE = """\
source: {_target_: mypackage.data.Prices}
name: prices
prefers: {model: mlp, task: regression}
num_features: 5
input_shape: ["${dataset.num_features}"]
standardize: true
has_test_split: false
test_fraction: 0.2
val_fraction: 0.15
split_seed: 0
batch_size: 16
num_workers: null
in_memory: true
"""
USER_MODEL = """\
_target_: mypackage.models.TinyNet
input_shape: ${dataset.input_shape}
num_classes: ${dataset.num_classes}
width: 64
"""


def test_a_users_new_dataset_and_model_yaml_compose_like_the_shipped_ones(tmp_path: Path) -> None:
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "dataset" / "shapes.yaml").write_text(USER_DATASET)
    (conf / "dataset" / "prices.yaml").write_text(USER_TABLE)
    (conf / "model" / "tiny_net.yaml").write_text(USER_MODEL)
    for option in ("shapes", "prices"):  # what test_data_options_compose runs for each of conf/dataset/*.yaml
        check_dataset_option(conf, option, tmp_path / f"d-{option}")
    check_model_option(conf, "tiny_net", tmp_path / "m-tiny_net")
    cfg = compose_in(conf, ["dataset=prices", "model=tiny_net", "task=regression"], tmp_path)
    with pytest.raises(UserError) as e:  # an image-or-class model on a regression table: refused, naming both
        validate(cfg)
    assert "model" in e.value.where and "dataset" in e.value.where


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
