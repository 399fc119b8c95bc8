"""The config's own checks, in process: typed schemas with their defaults and ranges, errors built from Hydra's
exception fields and config repository, and `lab.config.build` (one line for a library's rejection, the full
traceback for an exception raised in your own class)."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from lab.config import (
    CheckpointConfig,
    DatasetConfig,
    MonitorConfig,
    PathsConfig,
    build,
    check_schema,
    compose_train,
    parse_duration,
    validate,
)
from lab.errors import UserError


class RaisesInInit:
    """A user's class (outside lab) whose constructor fails."""

    def __init__(self, size: int = 1) -> None:
        raise RuntimeError("my callback is broken")


def test_schema_defaults_are_the_defaults(tmp_path: Path) -> None:
    cfg = compose_config([], tmp_path)
    for group, schema in (("checkpoint", CheckpointConfig), ("monitor", MonitorConfig)):
        assert OmegaConf.to_container(cfg[group]) == OmegaConf.to_container(OmegaConf.structured(schema))
    assert cfg.paths.data_dir == "./data" and PathsConfig.data_dir == "${paths.root_dir}/data"
    assert cfg.dataset.batch_size == DatasetConfig.batch_size and cfg.dataset.split_seed == 0


def test_a_dataset_may_add_its_own_keys_and_keeps_the_base_types(tmp_path: Path) -> None:
    cfg = compose_config(["+dataset.my_option=3"], tmp_path)
    assert cfg.dataset.my_option == 3
    with pytest.raises(UserError, match=r"\(dataset.batch_size\)"):
        compose_train(["dataset.batch_size=many"])


@pytest.mark.parametrize(
    ("value", "seconds"), [(90, 90.0), ("01:30", 90.0), ("1:00:00", 3600.0), ("1:00:00:00", 86400.0)]
)
def test_max_time_formats(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


def test_max_time_with_five_fields_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        parse_duration("1:02:03:04:05")
    with pytest.raises(UserError, match=r"\(trainer.max_time\)"):
        validate(compose_config(["trainer.max_time=1:02:03:04:05"], tmp_path))


def test_ranges_are_checked_in_nested_schemas() -> None:
    node = OmegaConf.create({"histograms": {"enabled": True, "every_n_steps": 0}})
    with pytest.raises(UserError) as error:
        check_schema(node, MonitorConfig, "monitor")
    assert str(error.value) == ("error: must be > 0, got 0 (monitor.histograms.every_n_steps): "
                                "set e.g. monitor.histograms.every_n_steps=1")  # fmt: skip


def test_unknown_option_lists_the_groups_options_from_the_repository() -> None:
    with pytest.raises(UserError) as error:
        compose_train(["scheduler=warp"])
    assert str(error.value) == (
        "error: unknown option 'warp' (scheduler): use one of cosine, none, onecycle, plateau, step"
    )


def test_unknown_key_lists_the_keys_of_the_chosen_option() -> None:
    with pytest.raises(UserError) as error:
        compose_train(["model=mlp", "model.hiden=32"])
    assert "(model.hiden): model has _target_, depth, dropout, hidden, input_shape, num_outputs" in str(
        error.value
    )
    with pytest.raises(UserError) as error:
        compose_train(["optimizer=sgd", "optimizer.momentun=0.5"])
    assert "momentum, nesterov" in str(error.value) and "betas" not in str(error.value)


def test_an_error_in_your_own_class_keeps_its_traceback() -> None:
    node = OmegaConf.create({"_target_": f"{__name__}.RaisesInInit"})
    with pytest.raises(RuntimeError, match="my callback is broken") as error:
        build(node, "callbacks.mine")
    frames = traceback.extract_tb(error.value.__traceback__)
    assert frames[-1].filename == __file__ and frames[-1].name == "__init__"


def test_a_library_rejection_and_an_unknown_argument_are_one_line() -> None:
    with pytest.raises(UserError) as error:
        build(
            OmegaConf.create({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": -1}), "model"
        )
    assert (
        str(error.value).startswith("error: ")
        and "(model)" in str(error.value)
        and "\n" not in str(error.value)
    )
    with pytest.raises(UserError) as error:
        build(OmegaConf.create({"_target_": f"{__name__}.RaisesInInit", "sise": 2}), "callbacks.mine")
    assert str(error.value) == (
        f"error: {__name__}.RaisesInInit takes no argument 'sise' (callbacks.mine.sise): use one of size"
    )


def test_the_dry_run_changes_nothing_of_the_run(tmp_path: Path) -> None:
    """Weights, BatchNorm statistics, the optimizer's state and learning rates and the RNGs are as they were."""
    import random

    import torch

    from lab.data import build_data
    from lab.dry_run import dry_run
    from lab.models import build_model
    from lab.optim import build_optimizer, build_schedulers
    from lab.train import build_mix

    cfg = compose_config(["mix=mixup", "scheduler=onecycle"], tmp_path)
    splits, model, task = build_data(cfg.dataset), build_model(cfg.model), build(cfg.task, "task")
    optimizer, mix = build_optimizer(cfg.optimizer, model), build_mix(cfg, task)
    build_schedulers(cfg.scheduler, optimizer, 10 * cfg.trainer.max_epochs)
    before = ({k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state(), random.getstate(),
              [g["lr"] for g in optimizer.param_groups], optimizer.state_dict()["state"])  # fmt: skip
    assert any("running_mean" in k for k in before[0])  # the model has BatchNorm statistics to keep
    dry_run(cfg, splits, model, task, optimizer, None, mix, 10, "cpu")
    after = model.state_dict()
    assert all(torch.equal(before[0][k], after[k]) for k in after) and model.training
    assert torch.equal(before[1], torch.get_rng_state()) and before[2] == random.getstate()
    assert (
        before[3] == [g["lr"] for g in optimizer.param_groups]
        and optimizer.state_dict()["state"] == before[4]
    )
