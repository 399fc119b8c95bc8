"""Config → build (dataset, model, task, optimizer, loggers, callbacks) → loop → checkpoints, metrics, logs.

`main(cfg)` is what `python train.py` runs inside `@hydra.main`; it returns the objective for sweepers: the best
value of `checkpoint.monitor`, or NaN for a failed or diverged run so that a sweep records it and goes on.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lab.config import validate
from lab.errors import EXIT_USER_ERROR, UserError, user_error_in

log = logging.getLogger("lab")

EXIT_DIVERGED = 3


def main(cfg: DictConfig) -> float:
    """Run one training job; user errors end it with one line and exit code 2 (NaN inside a sweep)."""
    from lab.trainer import TrainingDiverged, TrainingInterrupted

    try:
        if _in_multirun():  # a job of a re-run sweep that already finished is not run again
            from lab.sweep import finished_job

            done = finished_job(Path(cfg.paths.output_dir), _job_num())
            if done is not None:
                return done
        return run(cfg)
    except UserError as e:
        return _fail(cfg, e.line(), EXIT_USER_ERROR, status="failed")
    except OmegaConfBaseException as e:
        cause = user_error_in(e)
        if cause is None:
            raise
        return _fail(cfg, cause.line(), EXIT_USER_ERROR, status="failed")
    except TrainingDiverged as e:
        return _fail(cfg, f"error: training diverged (trainer): {e}", EXIT_DIVERGED, status="diverged")
    except TrainingInterrupted as e:
        log.warning("%s: exiting with code %d", e, 128 + e.signum)
        sys.exit(128 + e.signum)


def run_for_api(cfg: DictConfig) -> float:
    """`run` for `lab.fit`: a user error is recorded in metrics.json as `main` records it, then raised."""
    try:
        return run(cfg)
    except UserError as e:
        record_failure(cfg, e.line(), "failed")
        raise
    except OmegaConfBaseException as e:
        cause = user_error_in(e)
        if cause is None:
            raise
        record_failure(cfg, cause.line(), "failed")
        raise cause from None


def record_failure(cfg: DictConfig, line: str, status: str) -> None:
    output_dir = OmegaConf.select(cfg, "paths.output_dir", default=None)
    metrics = Path(output_dir) / "metrics.json" if output_dir else None
    # Never clobber the metrics.json of a finished run.
    if metrics is not None and metrics.parent.is_dir() and not metrics.exists():
        write_json(metrics, {"status": status, "error": line})


def _fail(cfg: DictConfig, line: str, code: int, status: str) -> float:
    from lab.redact import scrub_text, secret_values

    line = scrub_text(line, secret_values())
    print(line, file=sys.stderr, flush=True)
    record_failure(cfg, line, status)
    if _in_multirun():
        return math.nan  # the sweeper records a failed trial and the sweep goes on
    sys.exit(code)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_num() -> Any:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().job.num


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def print_config(config: dict[str, Any]) -> None:
    """The composed config (resolved, secrets masked) as a tree, one branch per group."""
    from rich import print as rich_print
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, value in config.items():
        text = OmegaConf.to_yaml(value) if isinstance(value, dict) else str(value)
        tree.add(str(key)).add(Syntax(text.rstrip(), "yaml", background_color="default"))
    rich_print(tree)


def model_summary(model: Any, example: Any) -> str:
    from torchinfo import summary

    stats = summary(model, input_data=example, verbose=0, depth=3, device=example.device,
                    col_names=("input_size", "output_size", "num_params", "trainable"))  # fmt: skip
    return str(stats)


def resolve_resume(cfg: DictConfig) -> None:
    """Which checkpoint this run continues from (sets `ckpt_path`); an explicit `ckpt_path` wins.

    A group that `torchrun --max-restarts=N` restarted continues from its run's own `last.pt` (lab.distributed keeps
    the run dir), whatever `ckpt_path` says. A sweep job continues from its own `last.pt` when an earlier run of the
    sweep was interrupted (see lab.sweep).
    `resume=auto` with a run folder (`hydra.run.dir=<run>`) continues that folder from its own `last.pt`, never
    another run's; without one, the newest `last.pt` of this task (`outputs/<task_name>/runs/*/`) in a new run dir
    (nothing earlier is touched). Either way the log says which file, or that none was found.
    """
    from omegaconf import open_dict

    from lab import checkpoint as ckpt
    from lab.distributed import restarted

    mode = cfg.get("resume")
    if mode not in (None, "auto"):
        raise UserError(f"unknown value {mode!r}", "resume", "use resume=auto or resume=null")
    own = Path(OmegaConf.select(cfg, "checkpoint.dirpath", default="") or cfg.paths.output_dir, "last.pt")
    if restarted() and own.is_file():  # the group torchrun restarted continues its run (same run dir)
        found, why = own, f"torchrun restarted the group: resuming from the run's own {own}"
    elif _in_multirun():
        found, why = (
            (own, f"sweep job {_job_num()}: resuming from its own {own}") if own.is_file() else (None, "")
        )
    elif mode is None or cfg.get("ckpt_path"):
        return
    elif _run_dir_given():
        found = own if own.is_file() else None
        why = f"resume=auto: continuing this run folder from its own {own}" if found else (
            f"resume=auto: no {own} yet, starting fresh in this run folder")  # fmt: skip
    else:
        found = ckpt.find_last(cfg.paths.log_dir, cfg.task_name)
        where = f"{cfg.paths.log_dir}/{cfg.task_name}/runs"
        why = f"resume=auto: resuming from {found}, the newest last.pt under {where}" if found else (
            f"resume=auto: no last.pt under {where}, starting fresh")  # fmt: skip
    if why:
        log.info(why)
    if found is not None:
        with open_dict(cfg):
            cfg.ckpt_path = str(found)


def carry_best_over(cfg: DictConfig) -> None:
    """Resuming training into a new run folder: the interrupted run's best.pt comes along (lab.checkpoint)."""
    from lab import checkpoint as ckpt

    dirpath = OmegaConf.select(cfg, "checkpoint.dirpath", default=None)
    if not (cfg.train and cfg.get("ckpt_path") and dirpath and cfg.checkpoint.save_top_k > 0):
        return
    carried = ckpt.carry_best_over(Path(cfg.ckpt_path), Path(dirpath))
    if carried is not None:
        log.info("resume: carried %s over to %s (the best weights so far)", Path(cfg.ckpt_path).parent / "best.pt",
                 carried)  # fmt: skip


def _run_dir_given() -> bool:
    """`hydra.run.dir=...` on the command line: the run continues in that folder."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and any(
        str(o).lstrip("+").startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra
    )


@dataclass
class Job:
    """Everything a run is made of, built from the config before the first step."""

    cfg: DictConfig
    config: dict[str, Any]  # resolved, secrets masked: what is printed, logged and saved
    output_dir: Path
    main_rank: bool  # only rank 0 of a torchrun job prints, logs and writes files
    ddp: Any
    splits: Any
    model: Any
    task: Any
    trainer: Any
    resume: dict[str, Any] | None  # the checkpoint of ckpt_path, its weights already in `model`
    summary: str  # torchinfo's, on rank 0


def run(cfg: DictConfig) -> float:
    """Check the config, build everything, train, evaluate the best weights, report."""
    from lab import run_lock

    resolve_resume(cfg)
    validate(cfg)  # paths.output_dir creatable, before anything takes or writes into it
    run_lock.acquire(cfg.paths.output_dir)  # one process per run folder, for the whole run
    try:
        job = build(cfg)  # the checkpoint is loaded and checked against the model before anything is carried
        carry_best_over(cfg)
        ddp, success = job.ddp, False
        try:
            best = fit_and_report(job)
            success = True
        finally:
            del job  # with it the DDP wrapper, which holds the process group: see Distributed.close
            ddp.close(success)
    finally:
        run_lock.release(cfg.paths.output_dir)
    return best


def build(cfg: DictConfig) -> Job:
    import torch

    from lab import checkpoint as ckpt
    from lab import distributed, inference
    from lab.callbacks import build_callbacks
    from lab.callbacks.early_stopping import EarlyStopping
    from lab.config import build as build_object
    from lab.config import check_monitor, monitors
    from lab.data import build_data, build_loaders
    from lab.dry_run import dry_run
    from lab.loggers import LoggerFanOut, build_loggers
    from lab.models import build_model
    from lab.optim import build_optimizer, build_schedulers
    from lab.optuna_trial import trial_callback
    from lab.redact import install_log_filter, redact, scrub_hydra_dir
    from lab.runtime import check_launch_env, check_writable, resolve_device, seed_everything
    from lab.trainer import Trainer, optimizer_steps, trainer_config

    check_launch_env()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    config = redact(resolved)  # secret-named keys and every known secret value masked
    scrub_hydra_dir(output_dir, resolved)
    install_log_filter(resolved)
    trainer_cfg = trainer_config(cfg.trainer)
    device = resolve_device(trainer_cfg.device)
    ddp, device = distributed.setup(trainer_cfg, device)  # one process, or one rank of a torchrun job
    main_rank = ddp.is_main
    if str(cfg.trainer.precision) == "16-mixed" and device.type != "cuda":
        raise UserError(f"16-mixed precision needs a CUDA GPU, this run is on {device.type}",
                        "trainer.precision", "use trainer.precision=bf16 or 32")  # fmt: skip
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    resume = ckpt.load(cfg.ckpt_path) if cfg.ckpt_path else None  # fail fast on a bad file

    splits = build_data(cfg.dataset)
    task = build_object(cfg.task, "task")
    mix = build_mix(cfg, task)
    augment = build_augment(cfg, task, splits)
    ema = OmegaConf.select(cfg, "callbacks.ema.validate", default=False)  # val_ema/<metric> is logged too
    logged = ["val", "train", *(["val_ema"] if ema else [])]
    for key, monitor in monitors(cfg):
        check_monitor(monitor, task.metric_names(), logged, key)
    loaders = build_loaders(splits, cfg.dataset, device, cfg.trainer.seed, ddp.rank, ddp.world_size)
    if augment is not None:  # training batches only: validation and test stay as they are
        from lab.data.augment import AugmentedLoader

        loaders["train"] = AugmentedLoader(loaders["train"], augment)
    model = build_model(cfg.model)
    if resume is not None:  # training continues from the trained weights, evaluation uses the inference ones
        ckpt.restore_model(
            model, resume, f"ckpt_path={cfg.ckpt_path}", cfg.checkpoint.strict, inference=not cfg.train
        )
    model.to(device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    # Before sharding: torchinfo's forward on rank 0 alone would wait for the other ranks under fsdp.
    summary = model_summary(model, task.example_input(device)) if main_rank else ""
    # fsdp: in place, before the optimizer is built over the shards (it refuses frozen blocks: never a cache).
    ddp.shard(cfg, model)
    head = cached_features_head(cfg, model, splits, device, ddp, loaders)
    optimizer = build_optimizer(cfg.optimizer, model)
    total_steps = optimizer_steps(trainer_cfg, len(loaders["train"]))
    schedulers = build_schedulers(cfg.scheduler, optimizer, total_steps)
    dry_run(cfg, splits, model, task, optimizer, augment, mix, total_steps, device)
    checkpoint_cfg = OmegaConf.to_container(cfg.checkpoint, resolve=True)
    sharded = ddp.sharded_state(model, optimizer)  # fsdp: every rank saves its shards
    checkpointer = ckpt.Checkpointer(**checkpoint_cfg, write=main_rank, sharded=sharded)
    if cfg.train and checkpointer.enabled and main_rank:
        check_writable(checkpointer.dirpath, "checkpoint.dirpath")  # not after the first epoch
    loggers = build_loggers(cfg.get("logger")) if main_rank else LoggerFanOut({})
    callbacks = build_callbacks(cfg.get("callbacks"))
    for name, callback in callbacks.items():  # a metric never logged would never improve: refused now
        if isinstance(callback, EarlyStopping):
            check_monitor(callback.monitor, task.metric_names(), logged, f"callbacks.{name}.monitor")
    trial = trial_callback(cfg)  # this job's Optuna trial (report, prune); None outside lab's Optuna sweeper
    if trial is not None:
        callbacks["optuna_trial"] = trial
    # Raw inputs → model → predictions, in every checkpoint: predict.py and the export need nothing else.
    preprocess = inference.record(config["dataset"], splits.extra, task, splits.class_names)
    trainer = Trainer(
        model, task, loaders, optimizer, trainer_cfg, schedulers=schedulers, loggers=loggers,
        checkpointer=checkpointer, callbacks=callbacks, module=head, distributed=ddp, device=device, mix=mix,
        class_names=splits.class_names, show_progress=main_rank,
        checkpoint_extra={"config": config, "class_names": splits.class_names, "preprocess": preprocess},
    )  # fmt: skip
    return Job(cfg, config, output_dir, main_rank, ddp, splits, model, task, trainer, resume, summary)


def build_mix(cfg: DictConfig, task: Any) -> Any:
    """`mix=<option>`: a torchvision.transforms.v2 MixUp/CutMix (or a choice of them) for training batches."""
    from lab.config import build as build_object
    from lab.tasks.classification import Classification

    node = cfg.get("mix")
    if not node:
        return None
    if not isinstance(task, Classification):
        raise UserError(f"MixUp/CutMix mix class labels into soft targets; {type(task).__name__} has none",
                        "mix", "leave mix unset (mix=null) for this task")  # fmt: skip
    if len(task.input_shape) != 3:
        raise UserError(f"MixUp/CutMix mix images (C, H, W); this dataset's inputs are {list(task.input_shape)}",
                        "mix", "leave mix unset (mix=null) for this dataset")  # fmt: skip
    return build_object(node, "mix")


def build_augment(cfg: DictConfig, task: Any, splits: Any) -> Any:
    """`augment=<preset>`: torchvision.transforms.v2 image augmentation of each training image (`BatchAugment`)."""
    from lab.config import build as build_object
    from lab.data.augment import BatchAugment

    node = cfg.get("augment")
    if not node:
        return None
    shape = list(getattr(task, "input_shape", None) or [])
    if "image_size" not in cfg.dataset or len(shape) != 3:
        raise UserError(f"augment presets transform images (C, H, W); {cfg.dataset.name}'s inputs are {shape}",
                        "augment", "leave augment unset (augment=null) for this dataset")  # fmt: skip
    splits.extra["augmented"] = True  # the training images change every epoch: no cached features
    transform = build_object(node, "augment")
    log.info("augment: %s on each training image, per batch on the training device (val/test as they are)",
             type(transform).__name__)  # fmt: skip
    return BatchAugment(transform, list(cfg.dataset.mean), list(cfg.dataset.std))


def cached_features_head(
    cfg: DictConfig, model: Any, splits: Any, device: Any, ddp: Any, loaders: dict
) -> Any:
    """A frozen backbone's features computed once (`model.cache_features`): `loaders` then serve them and the
    head alone runs in the loop (returned); None when the whole model runs."""
    from lab.data.features import cached_loaders, use_cache
    from lab.models.backbone import Backbone

    if not isinstance(model, Backbone):
        return None
    per_batch = [(key, what) for key, what in (("mix", "mixes"), ("augment", "augments")) if cfg.get(key)]
    if not use_cache(model, splits, per_batch):
        return None
    loaders |= cached_loaders(
        model, splits, cfg.dataset, device, cfg.trainer.seed, ddp.rank, ddp.world_size,
        cache_dir=cfg.paths.get("feature_cache"),  # shared by runs and sweep jobs (null: in memory only)
    )  # fmt: skip
    return model.head


def evaluated_weights(job: Job, best_state: dict[str, Any] | None) -> dict[str, Any]:
    """Which weights the final evaluation runs on, for metrics.json and the final figures: `weights` (a phrase)
    and `weights_epoch`."""
    from lab import checkpoint as ckpt

    cfg, trainer = job.cfg, job.trainer
    state = best_state if best_state is not None else (job.resume if not cfg.train else None)
    if state is not None:  # a checkpoint's inference weights: EMA averages when it says so
        averaged = ckpt.inference_weights(state) is not state["model"]
        epoch = int(state.get("epoch") or 0)
        source = "best.pt" if best_state is not None else f"ckpt_path={cfg.ckpt_path}"
    elif cfg.train:  # the weights training ended with (a callback may have put its averages in)
        states = [getattr(cb, "state_dict", dict)() for cb in trainer.callbacks.values()]
        averaged = any(isinstance(s, dict) and s.get("inference_weights") for s in states)
        epoch, source = trainer.state.epoch, "last"
    else:
        averaged, epoch, source = False, 0, "initial (train=false without ckpt_path)"
    kind = "EMA averages" if averaged else "trained weights"
    return {"weights": f"{source}, epoch {epoch}, {kind}", "weights_epoch": epoch}


def objective(monitor: str, metrics: dict[str, float], best_during_training: float | None) -> float | None:
    """The monitor's value on the evaluated weights: what metrics.json's `best` and a sweep rank by.

    A validation monitor (`val/acc`, `val_ema/acc`) is read from the final evaluation, so that it pairs with the
    test numbers of the same weights; a training one only exists during training (best.pt's own value)."""
    stage, _, name = monitor.partition("/")
    if stage.startswith("val"):
        return metrics.get(f"val/{name}")
    return best_during_training


def fit_and_report(job: Job) -> float:
    from lab import checkpoint as ckpt
    from lab import export
    from lab.loggers import flatten
    from lab.runtime import run_info
    from lab.trainer import TrainingInterrupted

    cfg, trainer, loggers = job.cfg, job.trainer, job.trainer.loggers
    checkpointer = trainer.checkpointer
    summary = job.summary
    if job.main_rank:
        if cfg.print_config:
            print_config(job.config)
        (job.output_dir / "model_summary.txt").write_text(summary + "\n")
        log.info("model summary:\n%s", summary)
        write_json(job.output_dir / "run_info.json", run_info())
        write_json(job.output_dir / "class_names.json", {"class_names": job.splits.class_names})
    if job.resume is not None and cfg.train:  # before anything is logged: the loggers continue their runs
        trainer.resume(cfg.ckpt_path, job.resume)

    status, best = "failed", None
    try:
        loggers.log_config(job.config)
        loggers.watch(trainer.network.module)  # the module that runs: the head alone on cached features
        loggers.log_text("config", OmegaConf.to_yaml(job.config))
        loggers.log_text("model_summary", summary)
        if cfg.train:
            trainer.fit()
        job.ddp.barrier()  # rank 0 has written best.pt
        # Final evaluation on the best weights (last ones when no best.pt was written): val and test of the same.
        best_kept = cfg.train and checkpointer.best_path.is_file()
        if best_kept:
            best_state = ckpt.load(checkpointer.best_path)
            ckpt.restore_model(job.model, best_state, str(checkpointer.best_path), inference=True)
        weights = evaluated_weights(job, best_state if best_kept else None)
        trainer.evaluated_weights = weights["weights"]  # the final figures say which weights they show
        metrics = trainer.evaluate("val", cfg.trainer.limit_val_batches)
        if cfg.test:
            metrics |= trainer.evaluate("test", cfg.trainer.limit_test_batches)
        trainer.callback("on_final_evaluation", metrics)
        best = objective(checkpointer.monitor, metrics, trainer.state.best if best_kept else None)
        final = {f"final/{k}": v for k, v in metrics.items()}
        loggers.log_metrics(final, trainer.state.global_step)
        loggers.log_hparams(flatten(job.config), final)
        if job.main_rank:
            write_json(job.output_dir / "metrics.json", {
                **metrics, **weights, "monitor": checkpointer.monitor, "mode": checkpointer.mode, "best": best,
                "epochs": trainer.state.epoch, "global_step": trainer.state.global_step,
                "status": "success", "stopped_early": trainer.should_stop,
                "stop_reason": trainer.stop_reason,
                **(trial.outcome() if (trial := trainer.callbacks.get("optuna_trial")) else {}),  # status: pruned
            })  # fmt: skip
            export.maybe_export(cfg, checkpointer.best_path, loggers)  # `export=[...]`: best.pt → export/
        log.info("final: %s", "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        status = "success"
    except BaseException as e:
        status = "interrupted" if isinstance(e, (TrainingInterrupted, KeyboardInterrupt)) else "failed"
        raise
    finally:
        try:
            checkpointer.close()  # a checkpoint still being written is completed, whatever happened
        finally:
            loggers.close(status)
            log.info("loggers closed (%s)", status)
    return float(best) if best is not None else math.nan
