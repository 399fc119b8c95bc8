"""The contracts a user extends lab through: `lab.Callback` (every hook, checked names) and `lab.loggers.Logger`
(the fan-out reaches every method of a backend), and the module structure (models never import checkpoints)."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import QUIET, ROOT, TINY, compose_config
from omegaconf import OmegaConf

import lab
from lab import checkpoint as ckpt
from lab.callbacks import HOOKS, Callback, build_callbacks
from lab.errors import UserError
from lab.loggers import Logger, LoggerFanOut, build_loggers
from lab.train import run

QUICK = [*TINY, *QUIET, "logger=none", "monitor=none"]


class Misspelled(Callback):
    def on_validation_ends(self, trainer: Any, metrics: dict[str, float]) -> None:  # no such hook
        trainer.should_stop = True


class Plain:  # has a hook's name, but is no Callback
    def on_fit_start(self, trainer: Any) -> None:
        pass


def test_a_misspelled_hook_is_refused_with_one_line() -> None:
    with pytest.raises(UserError) as error:
        build_callbacks(OmegaConf.create({"mine": {"_target_": "test_contracts.Misspelled"}}))
    line = error.value.line()
    assert line.startswith("error: ") and "\n" not in line and "(callbacks.mine)" in line
    assert "on_validation_ends" in line and all(hook in line for hook in HOOKS)


def test_a_callback_that_is_no_callback_subclass_is_refused_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        run(compose_config([*QUICK, "+callbacks.mine={_target_: test_contracts.Plain}"], tmp_path))
    line = error.value.line()
    assert (
        "test_contracts.Plain is no lab.Callback" in line and "(callbacks.mine)" in line and "\n" not in line
    )
    assert not list(tmp_path.rglob("*.pt"))  # refused before training


def test_every_hook_is_a_documented_no_op_and_the_base_class_is_exported() -> None:
    assert lab.Callback is Callback
    assert set(HOOKS) == {"on_fit_start", "on_train_epoch_start", "on_after_backward", "on_optimizer_step",
                          "on_validation", "on_validation_end", "on_fit_end", "on_final_evaluation"}  # fmt: skip
    for name in [*HOOKS, "state_dict", "load_state_dict"]:
        method = getattr(Callback, name)
        assert method.__doc__, name
        if name in HOOKS:
            assert list(inspect.signature(method).parameters)[:2] == ["self", "trainer"], name
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Add a callback.**") : readme.index("## Share what you trained")]
    assert "(Callback)" in section and all(hook in section for hook in HOOKS)


class Recorder(Callback):
    """Writes every hook call as (hook, epoch, global_step) to `path`."""

    def __init__(self, path: str) -> None:
        self.path, self.calls = Path(path), []
        self.resumed: dict[str, Any] | None = None

    def record(self, hook: str, trainer: Any) -> None:
        self.calls.append((hook, trainer.state.epoch, trainer.state.global_step))
        self.path.write_text(json.dumps(self.calls))

    def on_fit_start(self, trainer: Any) -> None:
        self.record("on_fit_start", trainer)

    def on_train_epoch_start(self, trainer: Any) -> None:
        self.record("on_train_epoch_start", trainer)

    def on_after_backward(self, trainer: Any) -> None:
        self.record("on_after_backward", trainer)

    def on_optimizer_step(self, trainer: Any) -> None:
        self.record("on_optimizer_step", trainer)

    def on_validation(self, trainer: Any, metrics: dict[str, float]) -> None:
        assert "val/acc" in metrics and "train/acc" not in metrics
        self.record("on_validation", trainer)

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        assert {"val/acc", "train/acc"} <= metrics.keys()
        self.record("on_validation_end", trainer)

    def on_fit_end(self, trainer: Any) -> None:
        self.record("on_fit_end", trainer)

    def on_final_evaluation(self, trainer: Any, metrics: dict[str, float]) -> None:
        assert "test/acc" in metrics
        self.record("on_final_evaluation", trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": len(self.calls)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls.append((f"load_state_dict:{state['calls']}", None, None))


def test_a_user_callback_runs_every_hook_in_order_through_a_real_run(tmp_path: Path) -> None:
    calls = tmp_path / "calls.json"
    recorder = f"+callbacks.recorder={{_target_: test_contracts.Recorder, path: '{calls}'}}"
    run(compose_config([*QUICK, recorder], tmp_path / "run"))  # 2 epochs of 4 batches
    epoch = ["on_train_epoch_start", *["on_after_backward", "on_optimizer_step"] * 4, "on_validation",
             "on_validation_end"]  # fmt: skip
    seen = json.loads(calls.read_text())
    assert [hook for hook, _, _ in seen] == [
        "on_fit_start",
        *epoch,
        *epoch,
        "on_fit_end",
        "on_final_evaluation",
    ]
    assert [(e, s) for h, e, s in seen if h == "on_optimizer_step"] == [(0, 1), (0, 2), (0, 3), (0, 4),
                                                                        (1, 5), (1, 6), (1, 7), (1, 8)]  # fmt: skip
    assert [(e, s) for h, e, s in seen if h == "on_validation_end"] == [(1, 4), (2, 8)]
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert ckpt.load(last)["callbacks"]["recorder"] == {"calls": 1 + 2 * len(epoch)}  # state, as of epoch 2

    resumed = tmp_path / "resumed.json"
    recorder = f"+callbacks.recorder={{_target_: test_contracts.Recorder, path: '{resumed}'}}"
    run(compose_config([*QUICK, recorder, f"ckpt_path={last}", "trainer.max_epochs=3"], tmp_path / "again"))
    seen = json.loads(resumed.read_text())
    assert [h for h, _, _ in seen] == [f"load_state_dict:{1 + 2 * len(epoch)}", "on_fit_start", *epoch,
                                       "on_fit_end", "on_final_evaluation"]  # fmt: skip
    assert seen[1][1:] == [2, 8]  # on_fit_start sees the resumed state


def test_early_stopping_counts_validations_and_refuses_a_metric_never_logged(tmp_path: Path, caplog) -> None:
    with pytest.raises(UserError) as error:
        run(compose_config([*QUICK, "callbacks.early_stopping.monitor=val/f1"], tmp_path / "bad"))
    line = error.value.line()
    assert "'val/f1' is not a metric" in line and "(callbacks.early_stopping.monitor)" in line
    assert "val/acc" in line and not list((tmp_path / "bad").rglob("*.pt"))
    # Four validations per epoch; accuracy cannot improve by more than 1: stops after the 1st + 3 more.
    caplog.set_level("INFO", logger="lab")
    overrides = ["trainer.val_check_interval=0.25", "callbacks.early_stopping.patience=3",
                 "callbacks.early_stopping.min_delta=1.0", "trainer.max_epochs=5"]  # fmt: skip
    run(compose_config([*QUICK, *overrides], tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["stopped_early"] is True and metrics["global_step"] == 4 and metrics["epochs"] == 1
    assert "early stopping: val/acc has not improved for 3 validations" in caplog.text


class EveryMethod(Logger):
    """A backend overriding each of Logger's methods: records the name of each one called."""

    called: ClassVar[list[str]] = []


for _name in [n for n, v in vars(Logger).items() if callable(v) and not n.startswith("_")]:
    setattr(EveryMethod, _name, lambda self, *a, _name=_name, **k: EveryMethod.called.append(_name) or {})


class NotALogger:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass


def test_the_fan_out_defines_every_logger_method_and_reaches_each_of_a_backend() -> None:
    import torch

    methods = sorted(n for n, v in vars(Logger).items() if callable(v) and not n.startswith("_"))
    assert "__getattr__" not in vars(LoggerFanOut) and not hasattr(LoggerFanOut, "__getattr__")
    assert all(name in vars(LoggerFanOut) for name in methods)  # written out, not inherited no-ops
    fan_out = LoggerFanOut({"every": EveryMethod()})
    x = torch.rand(2, 1, 4, 4)
    arguments = {
        "log_metrics": ({"a": 1.0}, 0), "log_hparams": ({"a": 1}, {"b": 2.0}), "log_text": ("t", "x"),
        "log_config": ({"a": 1},), "log_figure": ("f", object(), 0), "log_images": ("i", x, 0),
        "log_histogram": ("h", x, 0), "log_histograms": ({"h": x}, 0), "log_graph": (torch.nn.Identity(), x),
        "log_pr_curves": ("p", torch.tensor([0, 1]), torch.rand(2, 2), ["a", "b"], 0),
        "log_embedding": ("e", torch.rand(2, 3), ["a", "b"], None, 0), "log_export": (Path("."),),
        "watch": (torch.nn.Identity(),), "resume": (0, {}), "state_dict": (), "close": (),
    }  # fmt: skip
    assert sorted(arguments) == methods
    EveryMethod.called.clear()
    for name in methods:
        getattr(fan_out, name)(*arguments[name])
    assert EveryMethod.called == methods
    with pytest.raises(AttributeError):
        fan_out.log_anything  # noqa: B018 - a misspelled logging call is an error, not a silent no-op


def test_a_logger_that_is_no_logger_subclass_is_refused_with_one_line() -> None:
    with pytest.raises(UserError) as error:
        build_loggers(OmegaConf.create({"mine": {"_target_": "test_contracts.NotALogger"}}))
    line = error.value.line()
    assert "test_contracts.NotALogger is no lab.loggers.Logger" in line and "(logger.mine)" in line


def test_models_never_import_the_checkpoint_policy() -> None:
    for path in (ROOT / "src" / "lab" / "models").glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                imported.add(node.module or "")
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        assert not any(name == "lab.checkpoint" or name.startswith("lab.checkpoint.") for name in imported), (
            path
        )


class OnlyFitEnd(Callback):
    def on_fit_end(self, trainer: Any) -> None:
        pass


def test_dispatch_calls_only_the_hooks_a_callback_overrides() -> None:
    from lab.callbacks.base import hook_table

    callback = OnlyFitEnd()
    table = hook_table({"only": callback, "none": Callback()})
    assert table["on_fit_end"] == [callback.on_fit_end]
    assert all(methods == [] for hook, methods in table.items() if hook != "on_fit_end")


def test_lab_callbacks_use_only_the_documented_trainer_surface() -> None:
    """Every `trainer.<name>` that lab's own callbacks touch is listed in `lab.callbacks.base`'s docstring."""
    import re

    import lab.callbacks.base

    documented = set(re.findall(r"`trainer\.(\w+)", lab.callbacks.base.__doc__))
    sources = [*(ROOT / "src" / "lab" / "callbacks").glob("*.py"), ROOT / "src/lab/monitor.py",
               ROOT / "src/lab/optuna_trial.py"]  # fmt: skip
    for path in sources:
        used = {
            node.attr
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "trainer"
        }
        assert used <= documented, (path.name, sorted(used - documented))
