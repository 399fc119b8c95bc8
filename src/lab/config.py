"""Typed configs, and the checks on the composed config that types cannot express.

`TrainerConfig` and `CheckpointConfig` are structured-config schemas in Hydra's ConfigStore: `conf/trainer/*.yaml`
and `conf/checkpoint/*.yaml` extend them (`defaults: [schema, _self_]`), so OmegaConf rejects an unknown key or a
value of the wrong type while Hydra composes the config. The values and their comments live in the YAML files
only; the schemas hold types. `validate` adds the range checks and `precheck` turns Hydra's composition errors into
the one-line `error: <what> (<key>): <fix>` before anything is built or written.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional  # noqa: UP035  (OmegaConf reads these at runtime)

from omegaconf import MISSING, DictConfig, OmegaConf

from lab.errors import UserError

PRECISIONS = ("32", "bf16", "bf16-mixed", "16-mixed")
MODES = ("min", "max")
NAN_POLICIES = ("stop", "skip")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# `_target_` prefixes of library classes: their rejection of a config value is the user's to fix (one line);
# an exception raised in any other code (lab's, yours) keeps its traceback.
LIBRARIES = ("torch.", "torchvision.", "torchmetrics.", "sklearn.")


# Optional[...] rather than `X | None`: OmegaConf reads the annotations at runtime (Python 3.10 has no `X | None`
# for it under `from __future__ import annotations`).
@dataclass
class TrainerConfig:
    max_epochs: int = MISSING
    device: str = MISSING
    seed: Optional[int] = MISSING  # noqa: UP045
    deterministic: bool = MISSING
    precision: str = MISSING
    compile: bool = MISSING
    channels_last: bool = MISSING
    accumulate_grad_batches: int = MISSING
    strategy: str = MISSING
    gradient_clip_val: Optional[float] = MISSING  # noqa: UP045
    log_every_n_steps: int = MISSING
    limit_train_batches: Any = MISSING  # null, an int (batches) or a float (fraction): OmegaConf has no Union
    limit_val_batches: Any = MISSING
    limit_test_batches: Any = MISSING
    nan_policy: str = MISSING
    progress_bar: bool = MISSING
    stop_signals: List[str] = field(default_factory=list)  # noqa: UP006
    val_check_interval: Any = None  # null, an int (optimizer steps) or a float (fraction of an epoch)
    check_val_every_n_epoch: int = 1
    max_steps: Optional[int] = None  # noqa: UP045
    max_time: Any = None  # null, seconds or "[[DD:]HH:]MM:SS"
    sync_batchnorm: bool = False  # trainer=ddp only
    find_unused_parameters: bool = False  # trainer=ddp only


@dataclass
class CheckpointConfig:
    dirpath: Optional[str] = MISSING  # noqa: UP045
    monitor: str = MISSING
    mode: str = MISSING
    save_last: bool = MISSING
    save_top_k: int = MISSING
    every_n_epochs: int = MISSING
    every_n_steps: Optional[int] = MISSING  # noqa: UP045
    async_write: bool = MISSING
    strict: bool = MISSING
    save_frozen: bool = MISSING


def register_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="trainer", name="schema", node=TrainerConfig)
    store.store(group="checkpoint", name="schema", node=CheckpointConfig)


def build(node: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """`instantiate(node)` (called with `args` when it is a `_partial_`) before training starts.

    A library class that rejects a value from the config (`torch.optim.AdamW(betas=...)`, a scheduler's
    `T_max=abc`, an unknown argument) is a `UserError` naming `key` and the library's own message; an exception
    raised by your own class keeps its traceback.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = str(node.get("_target_", ""))
    for sub_key, sub_node in library_nodes(node, key):
        check_arguments(sub_node, sub_key)
    try:
        obj = instantiate(node, **kwargs)
        return obj(*args) if args else obj
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        # "Error in call to target 'torch.nn.modules.loss.CrossEntropyLoss': ..." names the class that failed.
        failed = re.findall(r"target '([^']+)'", str(e))
        failed_target = failed[-1] if failed else target
        if not failed_target.startswith(LIBRARIES) and e.__cause__ is not None:
            raise
        cause = e.__cause__ or e
        message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise UserError(
            f"{failed_target} rejected the config: {message}", key, f"fix the values under {key}"
        ) from None
    except (
        ValueError,
        TypeError,
    ) as e:  # raised by a library `_partial_` when called, e.g. Invalid learning rate
        if not target.startswith(LIBRARIES):
            raise
        raise UserError(f"{target} rejected the config: {e}", key, f"fix the values under {key}") from None


def library_nodes(node: Any, key: str) -> list[tuple[str, DictConfig]]:
    """(key, node) of every node under `node` (itself included) whose `_target_` is a library class."""
    if not isinstance(node, DictConfig):
        return []
    found = [(key, node)] if str(node.get("_target_", "")).startswith(LIBRARIES) else []
    for name in node:
        found += library_nodes(node.get(name), f"{key}.{name}")
    return found


def check_arguments(node: DictConfig, key: str) -> None:
    """The config's arguments against the library class's signature: unknown names, and values that are not of
    a plain annotated type (int, float, bool, str), which some classes only notice at their first step."""
    import inspect
    import typing

    from hydra.utils import get_object

    try:
        target = get_object(str(node._target_))
        signature = inspect.signature(target)
    except Exception:  # no signature to check against: instantiate reports what it finds
        return
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # annotations that do not evaluate here: names are still checked
        hints = {}
    params = signature.parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for name, value in node.items():
        name = str(name)
        if name.startswith("_"):
            continue
        if name not in params and not open_ended:
            known = [p for p in params if p not in ("self", "params", "optimizer")]
            raise UserError(f"{node._target_} takes no argument {name!r}", f"{key}.{name}",
                            f"use one of {', '.join(known)}")  # fmt: skip
        expected = hints.get(name)
        if expected in (int, float, bool, str) and value is not None and not _fits(value, expected):
            raise UserError(f"{node._target_} expects {expected.__name__}, got {value!r}", f"{key}.{name}",
                            f"set {key}.{name}=<{expected.__name__}>")  # fmt: skip


def _fits(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def positive_int(cfg: DictConfig, key: str, allow_zero: bool = False) -> int:
    value = get(cfg, key)
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(f"must be an integer {bound}, got {value!r}", key, f"set {key}=<integer {bound}>")
    return value


def number_in(cfg: DictConfig, key: str, low: float, high: float, why: str = "") -> float:
    """A number in (low, high]."""
    value = get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
        raise UserError(f"must be a number in ({low:g}, {high:g}]{why}, got {value!r}", key,
                        f"set {key}=<number in ({low:g}, {high:g}]>")  # fmt: skip
    return float(value)


def fraction(cfg: DictConfig, key: str) -> float:
    value = get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise UserError(f"must be a number in (0, 1), got {value!r}", key, f"set e.g. {key}=0.1")
    return float(value)


def choice(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> str:
    value = str(get(cfg, key))
    if value not in allowed:
        raise UserError(f"unknown value {value!r}", key, f"use one of {', '.join(allowed)}")
    return value


def batch_limit(cfg: DictConfig, key: str) -> None:
    """`limit_*_batches`: null (all), an int > 0 (that many batches) or a float in (0, 1] (that fraction)."""
    value = get(cfg, key)
    if value is None:
        return
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if bad or (isinstance(value, int) and value <= 0) or (isinstance(value, float) and not 0 < value <= 1):
        raise UserError(f"must be null, an integer > 0 or a fraction in (0, 1], got {value!r}", key)


def loop_options(cfg: DictConfig) -> None:
    """`trainer.val_check_interval`, `check_val_every_n_epoch`, `max_steps`, `max_time`."""
    interval = get(cfg, "trainer.val_check_interval")
    if interval is not None:
        bad = isinstance(interval, bool) or not isinstance(interval, (int, float))
        if (
            bad
            or (isinstance(interval, int) and interval <= 0)
            or (isinstance(interval, float) and not 0 < interval <= 1)
        ):
            raise UserError(f"must be null, an integer > 0 (optimizer steps) or a fraction in (0, 1] of an epoch, got "
                            f"{interval!r}", "trainer.val_check_interval", "set e.g. trainer.val_check_interval=0.25")  # fmt: skip
    positive_int(cfg, "trainer.check_val_every_n_epoch")
    if get(cfg, "trainer.max_steps") is not None:
        positive_int(cfg, "trainer.max_steps")
    max_time = get(cfg, "trainer.max_time")
    if max_time is not None:
        from lab.trainer import parse_duration

        try:
            ok = parse_duration(max_time) > 0 and not isinstance(max_time, bool)
        except ValueError:
            ok = False
        if not ok:
            raise UserError(f"must be null, seconds > 0 or [[DD:]HH:]MM:SS, got {max_time!r}", "trainer.max_time",
                            "set e.g. trainer.max_time=00:03:50:00 (3 h 50 min)")  # fmt: skip


def validate(cfg: DictConfig) -> None:
    """Fail fast on values that would otherwise crash (or silently misbehave) minutes into training."""
    positive_int(cfg, "dataset.batch_size")
    if get(cfg, "dataset.num_workers") is not None:  # null: from the CPU count
        positive_int(cfg, "dataset.num_workers", allow_zero=True)
    fraction(cfg, "dataset.val_fraction")
    if get(cfg, "dataset.test_fraction") is not None:
        fraction(cfg, "dataset.test_fraction")
    if get(cfg, "dataset.image_size") is not None:
        positive_int(cfg, "dataset.image_size")
        number_in(cfg, "dataset.image_size", 0, 4096, " pixels")  # 1..4096 with the line above
        positive_int(cfg, "dataset.channels")
    # Learning rates above 1 make every optimizer lab ships diverge (loss growing for the whole run).
    number_in(cfg, "optimizer.lr", 0, 1, " (a learning rate)")
    positive_int(cfg, "trainer.max_epochs")
    positive_int(cfg, "trainer.log_every_n_steps")
    positive_int(cfg, "trainer.accumulate_grad_batches")
    if get(cfg, "trainer.seed") is not None:
        positive_int(cfg, "trainer.seed", allow_zero=True)
    if get(cfg, "trainer.gradient_clip_val") is not None:
        number_in(cfg, "trainer.gradient_clip_val", 0, float("inf"))
    if get(cfg, "callbacks.early_stopping.patience") is not None:
        positive_int(cfg, "callbacks.early_stopping.patience")
    for key in ("trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.limit_test_batches"):
        batch_limit(cfg, key)
    loop_options(cfg)
    from lab.choices import check_choices

    check_choices(cfg)  # a model or task that cannot work with the dataset
    choice(cfg, "trainer.precision", PRECISIONS)
    choice(cfg, "trainer.nan_policy", NAN_POLICIES)
    signals = get(cfg, "trainer.stop_signals") or []
    unknown = [name for name in signals if not str(name).startswith("SIG") or not hasattr(signal, str(name))]
    if unknown:
        raise UserError(
            f"unknown signal {unknown[0]!r}", "trainer.stop_signals", "use e.g. [SIGINT,SIGTERM,SIGUSR1]"
        )
    choice(cfg, "checkpoint.mode", MODES)
    for key in ("checkpoint.save_top_k", "checkpoint.every_n_epochs"):
        positive_int(cfg, key, allow_zero=True)
    if get(cfg, "checkpoint.every_n_steps") is not None:
        positive_int(cfg, "checkpoint.every_n_steps")
    ckpt_path = get(cfg, "ckpt_path")
    if ckpt_path is not None and not Path(str(ckpt_path)).is_file():
        from lab.checkpoint import load

        load(ckpt_path)  # raises the UserError that says what is wrong with the path
    if not get(cfg, "train") and not get(cfg, "test"):
        raise UserError("nothing to do", "train=false test=false", "set train=true and/or test=true")
    if not get(cfg, "train") and ckpt_path is None:
        raise UserError(
            "evaluation needs a checkpoint", "ckpt_path", "set ckpt_path=<path to best.pt or last.pt>"
        )


def check_monitor(monitor: str, metric_names: list[str], stages: list[str] = ("val", "train")) -> None:
    """`checkpoint.monitor` must be a metric the task logs every epoch (train or val stage, val_ema with EMA)."""
    allowed = [f"{stage}/{name}" for stage in stages for name in metric_names]
    if monitor not in allowed:
        raise UserError(f"{monitor!r} is not a metric this task logs each epoch", "checkpoint.monitor",
                        f"use one of {', '.join(allowed)}")  # fmt: skip


# Command-line flags of Hydra's that take a value (everything else starting with "-" stands alone).
_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--info", "-i", "--experimental-rerun")
_OWN_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def precheck(argv: list[str]) -> None:
    """Compose the config the way `python train.py <argv>` will and fail with one line on what Hydra rejects.

    Hydra reports an unknown key, a value of the wrong type or an unknown option as a multi-line message; this
    turns them into `error: <what> (<key>): <fix>` (exit 2) before Hydra starts. Sweep values (`-m a=1,2`) are
    left to the sweeper: only the other overrides are checked then.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(arg.split("=")[0] in _OWN_CONFIG_FLAGS for arg in argv):
        return  # another config dir or name: Hydra reports on it itself
    overrides, skip = [], False
    for arg in argv:
        if skip or arg.startswith("-"):
            skip = arg in _FLAGS_WITH_VALUE and not skip
            continue
        overrides.append(arg)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        single = [o.input_line for o in parsed if not o.is_sweep_override()]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose("train", overrides=single)
    except Exception as e:  # everything composing raises is about the config or the command line
        raise composition_error(e) from None


def composition_error(error: BaseException) -> UserError:
    """One line for an error Hydra/OmegaConf raised while composing the config."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    cause: BaseException = error
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    text = str(error).strip()
    found = re.search(r"Could not find '([^']+)'", text)
    if isinstance(error, MissingConfigException) or found:
        # "In 'train': Could not find 'model/nope'  Available options in 'model': <one a line>  Config search path:"
        group, _, option = (found.group(1) if found else text).rpartition("/")
        listed = (
            text.split("Available options in", 1)[-1].split("Config search path")[0]
            if "Available" in text
            else ""
        )
        options = [line.strip() for line in listed.splitlines()[1:] if line.strip()]
        return UserError(f"unknown option {option!r}", group,
                         f"use one of {', '.join(options)}" if options else "")  # fmt: skip
    chosen = re.search(r"Multiple values for ([\w/]+)", text)
    if chosen:  # `+dataset=mnist` where the defaults already choose a dataset
        group = chosen.group(1)
        return UserError(
            f"{group} is chosen already by the defaults", group, f"use {group}=<option>, without +"
        )
    key = getattr(cause, "full_key", None) or ""
    message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
        parent, _, name = key.rpartition(".")
        known = _keys_under(parent)
        return UserError(f"unknown key {name!r}", key,
                         f"{parent or 'the config'} has {', '.join(known)}" if known else "")  # fmt: skip
    if isinstance(cause, ValidationError):
        return UserError(message, key or "config", "give a value of the type the key takes")
    return UserError(
        message, key or "command line", "check the override's spelling (see docs/configuration.md)"
    )


def _keys_under(parent: str) -> list[str]:
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            node = OmegaConf.select(compose("train"), parent) if parent else compose("train")
        return sorted(node.keys()) if isinstance(node, DictConfig) else []
    except Exception:
        return []
