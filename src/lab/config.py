"""Typed configs, and the checks on the composed config.

Every group whose keys lab defines has a structured-config schema here: its defaults are the defaults (a YAML file
that extends it with `defaults: [schema, _self_]` only overrides them) and each field's value range sits next to
it (`ranged`), checked by one function, `check_schema`. OmegaConf rejects an unknown key or a value of the wrong
type while Hydra composes the config; `precheck` turns that into the one-line `error: <what> (<key>): <fix>`
before anything is built or written, and `validate` adds the ranges and the checks that span keys.
This module imports no other lab module but `lab.errors`: it runs before anything is built.
"""

from __future__ import annotations

import functools
import re
import signal
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional  # noqa: UP035  (OmegaConf reads these at runtime)

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from lab.errors import UserError, user_error_in

PRECISIONS = ("32", "bf16", "bf16-mixed", "16-mixed")
MODES = ("min", "max")
NAN_POLICIES = ("stop", "skip")
EXPORT_FORMATS = ("state_dict", "safetensors", "onnx")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# `_target_` prefixes of library classes (and lab's own metrics): their rejection of a config value is the user's
# to fix (one line); an exception raised in any other code (yours) keeps its traceback.
LIBRARIES = ("torch.", "torchvision.", "torchmetrics.", "sklearn.", "lab.tasks.metrics.")


# ---- Value ranges, next to the field --------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """What a value must be beyond its type (`ok`), in words that complete "must be ..." (`want`)."""

    ok: Callable[[Any], bool]
    want: str
    example: str = ""


def ranged(default: Any, rule: Range) -> Any:
    """A dataclass field with a default and a value range (null always passes: the type says if it may be null)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"range": rule})
    return field(default=default, metadata={"range": rule})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def one_of(*allowed: str) -> Range:
    return Range(lambda v: str(v) in allowed, f"one of {', '.join(allowed)}", allowed[0])


def each_of(*allowed: str) -> Range:
    return Range(lambda v: all(str(x) in allowed for x in v), f"a list of {', '.join(allowed)}",
                 f"[{','.join(allowed[:2])}]")  # fmt: skip


POSITIVE = Range(lambda v: v > 0, "> 0", "1")
AT_LEAST_ZERO = Range(lambda v: v >= 0, ">= 0", "0")
AT_LEAST_TWO = Range(lambda v: v >= 2, ">= 2", "5")
FRACTION = Range(lambda v: 0 < v < 1, "a number in (0, 1)", "0.1")
UNIT_INTERVAL = Range(lambda v: 0 < v <= 1, "a number in (0, 1]", "0.5")
# Learning rates above 1 make every optimizer lab ships diverge (loss growing for the whole run).
LEARNING_RATE = Range(lambda v: _number(v) and 0 < v <= 1, "a learning rate in (0, 1]", "0.001")
IMAGE_SIZE = Range(lambda v: 0 < v <= 4096, "1..4096 pixels", "224")
BATCH_LIMIT = Range(lambda v: (_integer(v) and v > 0) or (isinstance(v, float) and 0 < v <= 1),
                    "null, an integer > 0 or a fraction in (0, 1]", "0.25")  # fmt: skip
VAL_INTERVAL = Range(BATCH_LIMIT.ok, "null, an integer > 0 (optimizer steps) or a fraction in (0, 1] of an epoch",
                     "0.25")  # fmt: skip
CLASS_NAMES = Range(lambda v: len(v) > 0 and all(str(x).isidentifier() for x in v), "a list of class names",
                    "[Linear]")  # fmt: skip
SIGNALS = Range(lambda v: all(str(s).startswith("SIG") and hasattr(signal, str(s)) for s in v),
                "a list of signal names", "[SIGINT,SIGTERM,SIGUSR1]")  # fmt: skip


def parse_duration(value: Any) -> float | None:
    """`trainer.max_time`: null, seconds, or "[[DD:]HH:]MM:SS" → seconds (ValueError for anything else)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) > 4:
            raise ValueError(f"more than DD:HH:MM:SS: {value!r}")
        return sum(
            float(part) * unit for part, unit in zip(reversed(parts), (1, 60, 3600, 86400), strict=False)
        )
    return float(value)


def _duration_ok(value: Any) -> bool:
    try:
        return parse_duration(value) > 0
    except (TypeError, ValueError):
        return False


DURATION = Range(_duration_ok, "null, seconds > 0 or [[DD:]HH:]MM:SS", "00:03:50:00")


# ---- Schemas: the defaults, the types, the ranges ---------------------------------------------------------------
# Optional[...] rather than `X | None`: OmegaConf reads the annotations at runtime (Python 3.10 has no `X | None`
# for it under `from __future__ import annotations`).


BLOCKS = ["ConvBlock", "BasicBlock", "Bottleneck", "InvertedResidual", "MBConv", "FusedMBConv", "CNBlock",
          "EncoderBlock", "Conv2dNormActivation", "Conv2d", "Linear"]  # fmt: skip


@dataclass
class FSDPConfig:
    """`trainer.fsdp`: how `trainer.strategy=fsdp` shards the model. → src/lab/fsdp.py, docs/speed-and-scale.md"""

    # Each module whose class has one of these names (outermost first) is one `fully_shard` unit; the root takes
    # what no unit holds. The defaults cover the shipped models: simple_cnn's conv blocks, the MLP's and every
    # head's Linear layers, the blocks of torchvision's ResNets, MobileNets, EfficientNets, ConvNeXts and ViTs.
    blocks: List[str] = ranged(BLOCKS, CLASS_NAMES)  # noqa: UP006
    # true: free the gathered parameters after each block's forward (gathered again for backward); false: keep
    # them to the backward (more memory, less communication); null: FSDP's choice (true, false for the root).
    reshard_after_forward: Optional[bool] = None  # noqa: UP045
    cpu_offload: bool = False  # CUDA only: sharded parameters, gradients and optimizer state in CPU memory
    async_save: bool = False  # write the sharded checkpoint in the background (torch.distributed.checkpoint)


@dataclass
class TrainerConfig:
    """`trainer`: the loop. → src/lab/trainer.py, conf/trainer/*.yaml"""

    max_epochs: int = ranged(10, POSITIVE)
    max_steps: Optional[int] = ranged(None, POSITIVE)  # noqa: UP045  stop after this many optimizer steps
    max_time: Any = ranged(None, DURATION)  # seconds or [[DD:]HH:]MM:SS of training in this process
    # Validate within epochs too: an int every N optimizer steps of each epoch, a float at every that fraction of
    # an epoch's optimizer steps (0.25: after 1/4, 1/2, 3/4 of them, and at the end); with or without accumulation.
    val_check_interval: Any = ranged(None, VAL_INTERVAL)
    check_val_every_n_epoch: int = ranged(1, POSITIVE)
    device: str = "auto"  # auto (cuda → mps → cpu) | cpu | cuda | cuda:N | mps
    seed: Optional[int] = ranged(42, AT_LEAST_ZERO)  # noqa: UP045
    deterministic: bool = False
    precision: str = ranged("32", one_of(*PRECISIONS))
    compile: bool = False
    channels_last: bool = False
    # An optimizer step every N batches; a shorter last window of an epoch is averaged over the batches it holds.
    accumulate_grad_batches: int = ranged(1, POSITIVE)
    strategy: str = ranged("auto", one_of("auto", "ddp", "fsdp"))
    gradient_clip_val: Optional[float] = ranged(None, POSITIVE)  # noqa: UP045
    log_every_n_steps: int = ranged(10, POSITIVE)
    limit_train_batches: Any = ranged(None, BATCH_LIMIT)  # null, an int (batches) or a float (fraction)
    limit_val_batches: Any = ranged(None, BATCH_LIMIT)
    limit_test_batches: Any = ranged(None, BATCH_LIMIT)
    nan_policy: str = ranged("stop", one_of(*NAN_POLICIES))
    progress_bar: bool = True
    stop_signals: List[str] = ranged(["SIGINT", "SIGTERM"], SIGNALS)  # noqa: UP006
    sync_batchnorm: bool = False  # DDP: BatchNorm statistics over the global batch (SyncBatchNorm, CUDA only)
    find_unused_parameters: bool = False  # DDP: true if some parameters get no gradient in a step (slower)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)  # trainer.strategy=fsdp

    def __post_init__(self) -> None:
        if isinstance(self.fsdp, dict):  # from a composed config (`lab.trainer.trainer_config`)
            self.fsdp = FSDPConfig(**self.fsdp)


@dataclass
class CheckpointConfig:
    """`checkpoint`: last.pt every epoch, best.pt by the monitored metric. → src/lab/checkpoint.py

    `monitor`/`mode` also drive early stopping, ReduceLROnPlateau and sweeps.
    """

    dirpath: Optional[str] = "${paths.output_dir}/checkpoints"  # noqa: UP045
    # Any metric the task logs: val/<name> or train/<name> (loss, acc, acc_top5, ...).
    monitor: str = "val/acc"
    mode: str = ranged("max", one_of(*MODES))
    save_last: bool = True  # checkpoints/last.pt: the newest complete training state
    # 0: no best.pt; 1: best.pt; k > 1: also keep the k best as epoch=NNN-<monitor>=<value>.pt
    save_top_k: int = ranged(1, AT_LEAST_ZERO)
    every_n_epochs: int = ranged(1, AT_LEAST_ZERO)  # write last.pt every N epochs
    every_n_steps: Optional[int] = ranged(None, POSITIVE)  # noqa: UP045  also every N optimizer steps (mid-epoch)
    # Write + fsync in a background thread while training goes on (false: in the loop).
    async_write: bool = True
    strict: bool = True  # false: load checkpoints whose keys only partly match the model (e.g. a new head)
    save_frozen: bool = False  # false: a frozen backbone is stored as its weights' name + fingerprint (lean)


@dataclass
class PathsConfig:
    """`paths`: where things live; relative paths are relative to the directory `python train.py` runs from."""

    root_dir: str = "."
    data_dir: str = "${paths.root_dir}/data"  # dataset cache (torchvision datasets download here)
    log_dir: str = "${paths.root_dir}/outputs"  # every run and sweep folder goes under here
    # This run's folder (hydra.run.dir / hydra.sweep.dir); null where Hydra runs no job (`--cfg job --resolve`).
    output_dir: Optional[str] = "${hydra:runtime.output_dir}"  # noqa: UP045
    feature_cache: Optional[str] = "${paths.log_dir}/cache/features"  # noqa: UP045  frozen-backbone features; null: off


# `Dict[str, Any]` as a base lets a dataset add its own keys (OmegaConf calls this deprecated, and keeps it).
warnings.filterwarnings("ignore", message="Class `DatasetConfig` subclasses `Dict`")


@dataclass
class DatasetConfig(Dict[str, Any]):  # noqa: UP006
    """`dataset`: the keys every dataset has (a dataset adds its own: `source`, `image_size`, `num_features`, …).

    → src/lab/data/__init__.py (splits, loaders)
    """

    name: str = MISSING
    batch_size: int = ranged(64, POSITIVE)
    val_fraction: float = ranged(0.1, FRACTION)  # of the training data, held out for validation
    test_fraction: Optional[float] = ranged(0.2, FRACTION)  # noqa: UP045  held out when has_test_split is false
    has_test_split: bool = False  # true: the source has its own test split (train=False)
    split_seed: int = ranged(0, AT_LEAST_ZERO)  # the train/val/test split does not change with trainer.seed
    num_workers: Optional[int] = ranged(None, AT_LEAST_ZERO)  # noqa: UP045  DataLoader workers; null: CPUs - 1 (≤ 8)
    prefetch_factor: Optional[int] = ranged(None, POSITIVE)  # noqa: UP045  batches a worker loads ahead; null: 2
    in_memory: bool = True  # whole split as one tensor on the device, batches by index (fast path)
    # k-fold cross-validation: what the test split leaves in `folds` stratified folds; fold `fold` validates.
    folds: Optional[int] = ranged(None, AT_LEAST_TWO)  # noqa: UP045
    fold: int = ranged(0, AT_LEAST_ZERO)  # 0 .. folds-1


@dataclass
class ImageInputs:
    """Keys of image datasets (checked where present, not added to other datasets)."""

    channels: int = ranged(1, POSITIVE)
    image_size: int = ranged(28, IMAGE_SIZE)


@dataclass
class TrainImages:
    enabled: bool = True
    count: int = ranged(32, POSITIVE)


@dataclass
class Histograms:
    enabled: bool = True
    every_n_steps: int = ranged(200, POSITIVE)


@dataclass
class Predictions:
    enabled: bool = False
    every_n_epochs: int = ranged(1, POSITIVE)
    count: int = ranged(16, POSITIVE)


@dataclass
class EveryNEpochs:
    enabled: bool = False
    every_n_epochs: Optional[int] = ranged(None, POSITIVE)  # noqa: UP045  null: only at the end of training


@dataclass
class Embedding:
    enabled: bool = False
    count: int = ranged(256, POSITIVE)


@dataclass
class MonitorConfig:
    """`monitor`: what is logged besides the scalars, each with an on/off and a frequency. → src/lab/monitor.py"""

    graph: bool = True  # the model graph, once at the start
    train_images: TrainImages = field(default_factory=TrainImages)  # a grid of training images, at the start
    histograms: Histograms = field(default_factory=Histograms)  # weights/<name>, grads/<name> after backward
    predictions: Predictions = field(
        default_factory=Predictions
    )  # a fixed val batch, predicted vs. true class
    confusion_matrix: EveryNEpochs = field(default_factory=EveryNEpochs)  # on each split in `stages`
    pr_curves: EveryNEpochs = field(default_factory=lambda: EveryNEpochs(enabled=True))  # one curve per class
    embedding: Embedding = field(default_factory=Embedding)  # penultimate features of val images, at the end
    stages: List[str] = ranged(["val", "test"], each_of("val", "test", "train"))  # noqa: UP006


@dataclass
class OptimizerOptions:
    """lab's own keys of `optimizer` (the others are the torch class's arguments, checked against it)."""

    lr: float = ranged(0.001, LEARNING_RATE)
    no_weight_decay: bool = False
    layer_decay: Optional[float] = ranged(None, UNIT_INTERVAL)  # noqa: UP045


@dataclass
class SchedulerOptions:
    """lab's own keys of `scheduler` (the others are the torch class's arguments, checked against it)."""

    interval: str = ranged("epoch", one_of("epoch", "step"))  # when the scheduler steps
    warmup_steps: int = ranged(0, AT_LEAST_ZERO)  # linear warm-up from lr/warmup_steps over this many steps
    monitor: Optional[str] = None  # noqa: UP045  ReduceLROnPlateau's metric


# ---- lab's own callbacks and loggers: `callbacks.<name>` and `logger.<name>` nodes ------------------------------
# Each YAML file of conf/callbacks/ and conf/logger/ extends its schema (`defaults: [/schema/<group>/<name>@<name>,
# _self_]`); a node built from one of these classes under any other name is checked against it too (`OWN_TARGETS`).


@dataclass
class EarlyStoppingConfig:
    """`callbacks.early_stopping`: stop when the monitored metric stops improving. → src/lab/callbacks/"""

    _target_: str = "lab.callbacks.early_stopping.EarlyStopping"
    monitor: str = "${checkpoint.monitor}"
    mode: str = ranged("${checkpoint.mode}", one_of(*MODES))
    # Validations (not epochs) without an improvement before stopping; null: off.
    patience: Optional[int] = ranged(None, Range(lambda v: v > 0, "null or > 0", "5"))  # noqa: UP045
    min_delta: float = ranged(0.0, AT_LEAST_ZERO)  # a change smaller than this is no improvement


@dataclass
class EMAConfig:
    """`callbacks.ema`: an exponential moving average of the weights. → src/lab/callbacks/ema.py"""

    _target_: str = "lab.callbacks.ema.EMA"
    # Per optimizer step; 1 - decay is the weight of the newest weights.
    decay: float = ranged(0.9998, Range(lambda v: 0 < v < 1, "a number in (0, 1)", "0.999"))
    warmup: bool = True  # decay min(decay, (1 + n) / (10 + n)) after n updates, as timm does
    # ema: the final evaluation and best.pt's inference weights (predict, export) are the averages; raw: the weights.
    evaluate_with: str = ranged("ema", one_of("ema", "raw"))
    validate: bool = True  # evaluate the averages at every validation (val_ema/<metric>)


@dataclass
class MonitorCallbackConfig:
    """`callbacks.monitor`: what the `monitor` group switches on. → src/lab/monitor.py"""

    _target_: str = "lab.monitor.Monitor"
    settings: Any = "${monitor}"
    mean: Optional[List[float]] = "${oc.select:dataset.mean,null}"  # noqa: UP006, UP045  to show images as they were
    std: Optional[List[float]] = "${oc.select:dataset.std,null}"  # noqa: UP006, UP045


@dataclass
class UnfreezeBackboneConfig:
    """`callbacks.unfreeze_backbone`, added by conf/model/backbone/base.yaml. → src/lab/callbacks/unfreeze.py"""

    _target_: str = "lab.callbacks.unfreeze.UnfreezeBackbone"
    epoch: Optional[int] = ranged(None, AT_LEAST_ZERO)  # noqa: UP045  train the head alone for N epochs


@dataclass
class CSVLoggerConfig:
    """`logger.csv`: one row per logging step. → src/lab/loggers/csv.py"""

    _target_: str = "lab.loggers.csv.CSVLogger"
    path: str = "${paths.output_dir}/metrics.csv"


@dataclass
class TensorBoardLoggerConfig:
    """`logger.tensorboard`: event files. → src/lab/loggers/tensorboard.py"""

    _target_: str = "lab.loggers.tensorboard.TensorBoardLogger"
    log_dir: str = "${paths.output_dir}/tensorboard"
    flush_secs: int = ranged(30, POSITIVE)  # write buffered events to disk at least this often
    # Events waiting for the writer thread before a log call blocks (torch's default, 10, made each epoch's burst
    # of weight/gradient histograms wait for the disk).
    max_queue: int = ranged(1000, POSITIVE)


@dataclass
class WandbWatch:
    log: Optional[str] = ranged("gradients", one_of("gradients", "parameters", "all"))  # noqa: UP045  null: no watch
    log_freq: int = ranged(100, POSITIVE)  # every N optimizer steps


@dataclass
class WandbLoggerConfig:
    """`logger.wandb`: Weights & Biases. → src/lab/loggers/wandb.py"""

    _target_: str = "lab.loggers.wandb.WandbLogger"
    save_dir: str = "${paths.output_dir}"
    project: str = "lab"
    entity: Optional[str] = None  # noqa: UP045  your W&B user or team; null: your default entity
    name: Optional[str] = None  # noqa: UP045  null: the Hydra job name + overrides, e.g. train:model=mlp
    group: Optional[str] = None  # noqa: UP045  null: the sweep folder's name in a multirun, none otherwise
    tags: List[str] = field(default_factory=list)  # noqa: UP006
    notes: Optional[str] = None  # noqa: UP045
    # null: WANDB_MODE, else online if an API key is found, else offline.
    mode: Optional[str] = ranged(None, one_of("online", "offline", "disabled"))  # noqa: UP045
    init_timeout: float = ranged(20.0, POSITIVE)  # seconds to wait for the W&B service before going offline
    watch: WandbWatch = field(default_factory=WandbWatch)
    # true: best.pt as a W&B Artifact at the end; all: also every epoch's last.pt.
    log_checkpoints: Any = ranged(False, Range(lambda v: v is True or v is False or v == "all",
                                               "true, false or all", "all"))  # fmt: skip
    checkpoint_dir: Optional[str] = "${checkpoint.dirpath}"  # noqa: UP045
    # The summary keeps these aggregates of a metric (define_metric); others keep their last value.
    summary: Dict[str, str] = field(  # noqa: UP006
        default_factory=lambda: {"val/acc": "max,last", "val/loss": "min,last", "train/loss": "min,last"}
    )


OWN = {
    "callbacks": {"early_stopping": EarlyStoppingConfig, "ema": EMAConfig, "monitor": MonitorCallbackConfig},
    "logger": {"csv": CSVLoggerConfig, "tensorboard": TensorBoardLoggerConfig, "wandb": WandbLoggerConfig},
}
# `_target_` → schema: lab's own classes wherever a config builds them.
OWN_TARGETS = {
    schema._target_: schema
    for schema in (*OWN["callbacks"].values(), *OWN["logger"].values(), UnfreezeBackboneConfig)
}


# Group → schema. Registered ones are the base of their YAML files (`defaults: [schema, _self_]`); all are
# checked by `check_schema` on the composed config.
REGISTERED = {"trainer": TrainerConfig, "checkpoint": CheckpointConfig, "paths": PathsConfig,
              "dataset": DatasetConfig, "monitor": MonitorConfig}  # fmt: skip
CHECKED = {**REGISTERED, "optimizer": OptimizerOptions, "scheduler": SchedulerOptions}


def register_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, schema in REGISTERED.items():
        store.store(group=group, name="schema", node=schema)
    for group, schemas in OWN.items():
        for name, schema in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=schema)


def check_schema(node: DictConfig, schema: type, key: str, typed: bool = False) -> None:
    """`node`'s keys that `schema` has: of its types (unless `typed`: checked already, as part of the node
    above) and in its ranges."""
    hints, schema_fields = schema_info(schema)
    typed = typed or OmegaConf.get_type(node) is schema  # composed on the schema: OmegaConf typed it
    known = [f for f in schema_fields if f.name in node]
    try:
        values = {f.name: node[f.name] for f in known}  # each resolved once
        if not typed:
            OmegaConf.merge(structured(schema), values)
    except Exception as e:  # an OmegaConf ValidationError: a value of the wrong type
        if (cause := user_error_in(e)) is not None:  # raised by a resolver while reading a value
            raise cause from None
        name = getattr(e, "full_key", "") or ""
        raise UserError(str(e).splitlines()[0], f"{key}.{name}" if name else key,
                        "give a value of the type the key takes") from None  # fmt: skip
    for f in known:
        name, value = f.name, values[f.name]
        if isinstance(value, DictConfig) and is_dataclass(hints.get(name)):
            check_schema(value, hints[name], f"{key}.{name}", typed=True)
        rule = f.metadata.get("range")
        if rule is not None and value is not None and not rule.ok(value):
            shown = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
            where = written_at(node, name, f"{key}.{name}")
            raise UserError(f"must be {rule.want}, got {shown!r}", where, f"set e.g. {where}={rule.example}")


@functools.cache
def schema_info(schema: type) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """The schema's type hints and fields, read once per process."""
    return typing.get_type_hints(schema), fields(schema)


@functools.cache
def structured(schema: type) -> DictConfig:
    """The schema as an OmegaConf config, built once per process (`merge` copies it, never changes it)."""
    return OmegaConf.structured(schema)


def written_at(node: DictConfig, name: str, key: str) -> str:
    """Where the user sets a value: `key`, or `a.b` when the value is `${a.b}` (e.g. the unfreezing callback's
    `epoch: ${model.unfreeze_at_epoch}`)."""
    if not OmegaConf.is_interpolation(node, name):
        return key
    written = re.fullmatch(r"\$\{([\w.]+)\}", str(OmegaConf.to_container(node, resolve=False)[name]))
    return written.group(1) if written else key


# ---- Building objects from the config -------------------------------------------------------------------------


def build(node: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """`instantiate(node)` (called with `args` when it is a `_partial_`) before training starts.

    Every `_target_` under `node` is first checked against its class's signature (`check_arguments`). A library
    class that rejects a value (`torch.optim.AdamW(betas=...)`, a scheduler's `T_max=abc`) is a `UserError` naming
    `key` and the library's own message; an exception raised by any other class (yours) is raised as it was, with
    its traceback, not inside Hydra's `InstantiationException`.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = str(node.get("_target_", ""))
    for sub_key, sub_node in target_nodes(node, key):
        check_arguments(sub_node, sub_key)
    try:
        obj = instantiate(node, **kwargs)
        return obj(*args) if args else obj
    except InstantiationException as e:
        cause = e.__cause__
        if cause is None:  # Hydra's own complaint (e.g. a `_target_` that does not import)
            raise UserError(str(e).splitlines()[0], key, f"fix {key}._target_") from None
        if isinstance(cause, UserError) or not _from_library(cause):
            raise cause from None  # yours: with its own traceback
        raise library_error(cause, failed_key(e, key)) from None
    except (
        ValueError,
        TypeError,
    ) as e:  # raised by a library `_partial_` when called, e.g. Invalid learning rate
        if not target.startswith(LIBRARIES):
            raise
        raise UserError(f"{target} rejected the config: {e}", key, f"fix the values under {key}") from None


def _from_library(error: BaseException) -> bool:
    """Whether `error` was raised in a library class's code (the innermost frame below Hydra's is a library's)."""
    import traceback

    frames = [f.filename for f in traceback.extract_tb(error.__traceback__)]
    ours = [name for name in frames if "/hydra/" not in name]
    if not ours:
        return True
    innermost_call = ours[0]  # the frame Hydra called: the class's own __init__
    # A library's package folder (`/torch/`) or module file (`/lab/tasks/metrics.py`).
    paths = [f"/{lib.rstrip('.').replace('.', '/')}" for lib in LIBRARIES]
    return any(f"{path}/" in innermost_call or innermost_call.endswith(f"{path}.py") for path in paths)


def failed_key(error: BaseException, key: str) -> str:
    """The key of the node whose call failed under `key` (Hydra names it, e.g. `task.metrics.acc`), else `key`."""
    named = re.search(r"^full_key: (\S+)$", str(error), re.MULTILINE)
    return named.group(1) if named and named.group(1).startswith(f"{key}.") else key


def library_error(error: BaseException, key: str, target: str = "") -> UserError:
    """One line for what a library class raised about a value from the config under `key`."""
    message = f"{type(error).__name__}: {str(error).splitlines()[0]}" if str(error) else type(error).__name__
    return UserError(f"{target} rejected the config: {message}" if target else message, key,
                     f"fix the values under {key}")  # fmt: skip


def target_nodes(node: Any, key: str) -> list[tuple[str, DictConfig]]:
    """(key, node) of every node under `node` (itself included) that has a `_target_`."""
    if not isinstance(node, DictConfig):
        return []
    found = [(key, node)] if node.get("_target_") else []
    for name in node:
        found += target_nodes(node.get(name), f"{key}.{name}")
    return found


def check_arguments(node: DictConfig, key: str) -> None:
    """The config's arguments against the class's signature: unknown names, and values that are not of a plain
    annotated type (int, float, bool, str), which some classes only notice at their first step."""
    import inspect

    from hydra.utils import get_object

    try:
        target = get_object(str(node._target_))
    except Exception as e:
        raise UserError(f"cannot import {node._target_} ({type(e).__name__})", f"{key}._target_",
                        "give the full dotted name of a class or function") from None  # fmt: skip
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # no signature to check against: instantiate reports what it finds
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
        return _number(value)
    if expected is int:
        return _integer(value)
    return isinstance(value, expected)


# ---- Checks on the composed config ----------------------------------------------------------------------------


def validate(cfg: DictConfig) -> None:
    """Fail fast on values that would otherwise crash (or silently misbehave) minutes into training."""
    from lab.choices import check_choices

    check_choices(cfg)  # a model or task that cannot work with the dataset
    for group, schema in CHECKED.items():
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            check_schema(node, schema, group)
    check_schema(cfg.dataset, ImageInputs, "dataset")
    folds, fold = cfg.dataset.get("folds"), cfg.dataset.get("fold")
    if folds is not None and fold is not None and fold >= folds:
        raise UserError(f"fold {fold} of {folds} folds", "dataset.fold", f"use 0..{folds - 1}")
    export = cfg.get("export")
    if export is not None and not (isinstance(export, ListConfig) and each_of(*EXPORT_FORMATS).ok(export)):
        raise UserError(f"unknown export format in {export}", "export",
                        f"use a list of {', '.join(EXPORT_FORMATS)}, e.g. export=[state_dict,onnx]")  # fmt: skip
    for group in OWN:  # lab's own callbacks and loggers, under whatever name
        for name, node in (cfg.get(group) or {}).items():
            schema = OWN_TARGETS.get(str(node.get("_target_"))) if isinstance(node, DictConfig) else None
            if schema is not None:
                check_schema(node, schema, f"{group}.{name}")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not Path(str(ckpt_path)).is_file():
        what = (
            "is a directory, not a checkpoint file"
            if Path(str(ckpt_path)).is_dir()
            else "checkpoint file not found"
        )
        raise UserError(
            what, f"ckpt_path={ckpt_path}", "give the path of a .pt file, e.g. <run dir>/checkpoints/last.pt"
        )
    if not cfg.get("train") and not cfg.get("test"):
        raise UserError("nothing to do", "train=false test=false", "set train=true and/or test=true")
    if not cfg.get("train") and ckpt_path is None:
        raise UserError(
            "evaluation needs a checkpoint", "ckpt_path", "set ckpt_path=<path to best.pt or last.pt>"
        )
    if cfg.paths.output_dir is not None:
        creatable(cfg.paths.output_dir, "paths.output_dir")


def creatable(directory: str, key: str) -> None:
    """Create `directory` (and its parents) now, so that a path that cannot exist is one line, not a traceback."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {directory} ({e.strerror or type(e).__name__})", key,
                        "choose a folder you can write to") from None  # fmt: skip


def check_monitor(
    monitor: str, metric_names: Sequence[str], stages: Sequence[str] = ("val", "train"),
    key: str = "checkpoint.monitor",
) -> None:  # fmt: skip
    """A monitored metric (`checkpoint.monitor`, a callback's or scheduler's `monitor`) must be one the task logs
    every epoch (train or val stage, val_ema with EMA)."""
    allowed = [f"{stage}/{name}" for stage in stages for name in metric_names]
    if monitor not in allowed:
        raise UserError(f"{monitor!r} is not a metric this task logs each epoch", key,
                        f"use one of {', '.join(allowed)}")  # fmt: skip


def monitors(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, metric) of every monitor the config sets: the checkpoint's, each callback's, the scheduler's."""
    found = [("checkpoint.monitor", cfg.checkpoint.monitor)]
    for name, node in (cfg.get("callbacks") or {}).items():
        if isinstance(node, DictConfig) and node.get("monitor") is not None:
            found.append((f"callbacks.{name}.monitor", node.monitor))
    if OmegaConf.select(cfg, "scheduler._target_") and OmegaConf.select(cfg, "scheduler.monitor") is not None:
        found.append(("scheduler.monitor", cfg.scheduler.monitor))
    return found


# ---- Composition errors, before Hydra starts ------------------------------------------------------------------

# Command-line flags of Hydra's that take a value (everything else starting with "-" stands alone).
_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--info", "-i", "--experimental-rerun")
_OWN_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def overrides_of(argv: Sequence[str]) -> list[str]:
    """The `key=value` overrides of a `train.py` command line (Hydra's flags left out)."""
    overrides, skip = [], False
    for arg in argv:
        if skip or arg.startswith("-"):
            skip = arg in _FLAGS_WITH_VALUE and not skip
            continue
        overrides.append(arg)
    return overrides


def precheck(argv: Sequence[str]) -> None:
    """Compose the config the way `python train.py <argv>` will and fail with one line on what Hydra rejects.

    Sweep values (`-m a=1,2`) are left to the sweeper: only the other overrides are checked then.
    """
    if any(arg.split("=")[0] in _OWN_CONFIG_FLAGS for arg in argv):
        return  # another config dir or name: Hydra reports on it itself
    compose_train(overrides_of(argv), single_only=True)


def run_composed(overrides: Sequence[str], task: Callable[[DictConfig], Any]) -> Any:
    """Hydra's run of `task` on `conf/train.yaml` composed with `overrides` (the run folder, `.hydra/`, logging and
    Hydra callbacks of `python train.py`), returning Hydra's `JobReturn`; the config is composed once.

    Only when Hydra's run fails before the task starts is the config composed again (`compose_train`): a mistake
    is the one-line `UserError` that names it, a config whose own files ask for a sweep is a `SweepConfig`; an
    exception raised once the task has started is raised as it is.
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    started = False

    def job(cfg: DictConfig) -> Any:
        nonlocal started
        started = True
        return task(cfg)

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), job_name="train", version_base="1.3"):
            hydra = GlobalHydra.instance().hydra
            return hydra.run("train", job, list(overrides), with_log_configuration=True)
    except Exception as e:
        if started:
            raise
        error = e
    # Outside Hydra's context, which is gone now: the one line for a mistake, or a config that sweeps.
    hydra_cfg = compose_train(overrides, single_only=True, return_hydra_config=True).hydra
    if hydra_cfg.mode == RunMode.MULTIRUN:
        raise SweepConfig("the config asks for a sweep (hydra.mode: MULTIRUN)", "hydra.mode",
                          "run it with python train.py -m ...") from None  # fmt: skip
    compose_train(overrides)  # a sweep value (`a=1,2`) without a sweep
    raise error


class SweepConfig(UserError):
    """`run_composed` on a config whose own files set `hydra.mode: MULTIRUN`: a sweep, for Hydra's command line."""


def compose_train(
    overrides: Sequence[str], single_only: bool = False, return_hydra_config: bool = False
) -> Any:
    """`conf/train.yaml` composed with `overrides`; what Hydra rejects is one `UserError`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as e:  # a syntax error in an override
        raise UserError(str(e).strip().splitlines()[0], "command line",
                        "check the override's spelling (see docs/configuration.md)") from None  # fmt: skip
    chosen = [o.input_line for o in parsed if not (single_only and o.is_sweep_override())]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return compose("train", overrides=chosen, return_hydra_config=return_hydra_config)
        except Exception as e:  # everything composing raises is about the config or the command line
            loader = GlobalHydra.instance().config_loader()
            raise composition_error(e, parsed, loader) from None


def composition_error(error: BaseException, overrides: Sequence[Any], loader: Any) -> UserError:
    """One line for an error Hydra/OmegaConf raised while composing the config, from the exception's fields (the
    missing option, the node that has no such key) and Hydra's config repository, never its message text."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        options = error.options or loader.get_group_options(group)
        return UserError(f"unknown option {option!r}", group or "config",
                         f"use one of {', '.join(options)}" if options else "")  # fmt: skip
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if cause is None:
        for o in overrides:  # `+dataset=mnist` where the defaults already choose a dataset
            group = o.get_key_element().lstrip("+")
            if o.is_add() and loader.get_group_options(group):
                return UserError(f"{group} is chosen already by the defaults", group,
                                 f"use {group}=<option>, without +")  # fmt: skip
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return UserError(message, "command line", "check the override's spelling (see docs/configuration.md)")
    key = getattr(cause, "full_key", None) or ""
    message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
        parent, _, name = key.rpartition(".")
        node = cause.parent_node  # the chosen option's node: its keys are the ones there are
        known = sorted(str(k) for k in node) if isinstance(node, DictConfig) else []
        return UserError(f"unknown key {name!r}", key,
                         f"{parent or 'the config'} has {', '.join(known)}" if known else "")  # fmt: skip
    if isinstance(cause, ValidationError):
        return UserError(message, key or "config", "give a value of the type the key takes")
    return UserError(
        message, key or "command line", "check the override's spelling (see docs/configuration.md)"
    )
