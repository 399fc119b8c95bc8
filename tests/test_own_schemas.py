"""Typed schemas of lab's own callbacks and loggers: their defaults are the defaults, they match the classes'
arguments, and a bad value is one line naming the key and what it takes, before anything is trained."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import QUIET, compose_config
from hydra.utils import get_object
from omegaconf import OmegaConf

from lab.config import OWN, OWN_TARGETS, compose_train
from lab.errors import UserError
from lab.train import run

BAD = [
    # (overrides, the error line)
    (["callbacks=[default,ema]", "callbacks.ema.decay=1.5"],
     "error: must be a number in (0, 1), got 1.5 (callbacks.ema.decay): set e.g. callbacks.ema.decay=0.999"),
    (["callbacks=[default,ema]", "callbacks.ema.decai=0.9"],
     "error: unknown key 'decai' (callbacks.ema.decai): callbacks.ema has _target_, decay, evaluate_with, "
     "validate, warmup"),
    (["callbacks.early_stopping.patience=-1"],
     "error: must be null or > 0, got -1 (callbacks.early_stopping.patience): "
     "set e.g. callbacks.early_stopping.patience=5"),
    (["callbacks.monitor.mean=[a]"],
     "error: Value 'a' of type 'str' could not be converted to Float (callbacks.monitor.mean[0]): "
     "give a value of the type the key takes"),
    # The unfreezing callback takes its epoch from the model's key: the line names that key.
    (["model=resnet18_frozen", "model.weights=null", "model.unfreeze_at_epoch=-1"],
     "error: must be >= 0, got -1 (model.unfreeze_at_epoch): set e.g. model.unfreeze_at_epoch=0"),
    # A callback of lab's under a name of your own is checked all the same.
    (["+callbacks.slow={_target_: lab.callbacks.ema.EMA, decay: 2}"],
     "error: must be a number in (0, 1), got 2 (callbacks.slow.decay): set e.g. callbacks.slow.decay=0.999"),
    (["logger=tensorboard", "logger.tensorboard.flush_secs=0"],
     "error: must be > 0, got 0 (logger.tensorboard.flush_secs): set e.g. logger.tensorboard.flush_secs=1"),
    (["logger=csv", "logger.csv.path=null"],
     "error: field 'logger.csv.path' is not Optional (logger.csv.path): give a value of the type the key takes"),
    (["logger=wandb", "logger.wandb.log_checkpoints=some"],
     "error: must be true, false or all, got 'some' (logger.wandb.log_checkpoints): "
     "set e.g. logger.wandb.log_checkpoints=all"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "line"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_bad_value_is_one_line_before_training(overrides: list[str], line: str, tmp_path: Path) -> None:
    """Composed as `python train.py` composes (an unknown key or a wrong type fails here), then run (a value out
    of its range fails in the checks before anything is built)."""
    with pytest.raises(UserError) as error:
        run(compose_train(["debug=fast", *QUIET, f"paths.output_dir={tmp_path}", *overrides]))
    assert error.value.line() == line
    assert not list(tmp_path.rglob("*.pt"))  # nothing trained, no checkpoint


def test_the_schemas_are_the_defaults_and_the_classes_arguments(tmp_path: Path) -> None:
    cfg = compose_config(["logger=many", "callbacks=[default,ema]"], tmp_path)
    for group, schemas in OWN.items():
        for name, schema in schemas.items():  # the YAML files add nothing to their schema
            composed = OmegaConf.to_container(cfg[group][name])
            assert composed == OmegaConf.to_container(OmegaConf.structured(schema)), f"{group}.{name}"
    for target, schema in OWN_TARGETS.items():  # a schema's keys are the class's arguments, and its defaults
        parameters = inspect.signature(get_object(target)).parameters
        assert {f.name for f in fields(schema)} - {"_target_"} == set(parameters), target
        for name, p in parameters.items():  # (a default read from another key is the config's alone)
            default = getattr(schema, name, p.empty)
            if p.default is not p.empty and default is not p.empty and "${" not in str(default):
                assert p.default == default, f"{target}: {name}"
