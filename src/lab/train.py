"""Config → build (data, model, optimizer, loggers) → loop → checkpoints, metrics, logs.

`main(cfg)` is what `python train.py` runs inside `@hydra.main`; it returns the objective for sweepers: the best
value of `checkpoint.monitor`, or NaN for a failed or diverged run so that a sweep records it and goes on.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lab.config import validate
from lab.errors import EXIT_USER_ERROR, UserError

log = logging.getLogger("lab")

EXIT_DIVERGED = 3


def main(cfg: DictConfig) -> float:
    """Run one training job; user errors end it with one line and exit code 2 (NaN inside a sweep)."""
    from lab.trainer import TrainingDiverged, TrainingInterrupted

    try:
        return run(cfg)
    except UserError as e:
        return _fail(cfg, e.line(), EXIT_USER_ERROR, status="failed")
    except OmegaConfBaseException as e:
        # A UserError raised inside a config resolver, e.g. ${weights_meta:...}, arrives wrapped by OmegaConf.
        cause = e
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        return _fail(cfg, cause.line(), EXIT_USER_ERROR, status="failed")
    except TrainingDiverged as e:
        return _fail(cfg, f"error: training diverged (trainer): {e}", EXIT_DIVERGED, status="diverged")
    except TrainingInterrupted as e:
        log.warning("%s: exiting with code %d", e, 128 + e.signum)
        sys.exit(128 + e.signum)


def _fail(cfg: DictConfig, line: str, code: int, status: str) -> float:
    print(line, file=sys.stderr, flush=True)
    output_dir = OmegaConf.select(cfg, "paths.output_dir", default=None)
    metrics = Path(output_dir) / "metrics.json" if output_dir else None
    # Never clobber the metrics.json of a finished run.
    if metrics is not None and metrics.parent.is_dir() and not metrics.exists():
        write_json(metrics, {"status": status, "error": line})
    if _in_multirun():
        return math.nan  # the sweeper records a failed trial and the sweep goes on
    sys.exit(code)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


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


def model_summary(model: Any, input_shape: tuple[int, ...], device: Any) -> str:
    import torch
    from torchinfo import summary

    # Zeros rather than torchinfo's random input: the summary must not consume the seeded RNG.
    example = torch.zeros(input_shape, device=device)
    stats = summary(model, input_data=example, verbose=0, depth=3, device=device,
                    col_names=("input_size", "output_size", "num_params", "trainable"))  # fmt: skip
    return str(stats)


def resolve_resume(cfg: DictConfig) -> None:
    """`resume=auto`: continue from the newest `last.pt` of this task (`outputs/<task_name>/runs/*/`), if any.

    An explicit `ckpt_path` wins. The resumed run writes into its own new run dir (nothing earlier is touched)
    unless `hydra.run.dir=<old run dir>` is given to continue in place.
    """
    from omegaconf import open_dict

    from lab import checkpoint as ckpt

    mode = cfg.get("resume")
    if mode is None:
        return
    if mode != "auto":
        raise UserError(f"unknown value {mode!r}", "resume", "use resume=auto or resume=null")
    if _in_multirun():
        raise UserError("resume=auto would give every job of a sweep the same checkpoint", "resume",
                        "resume single runs, or pass ckpt_path per job")  # fmt: skip
    if cfg.get("ckpt_path"):
        return
    found = ckpt.find_last(cfg.paths.log_dir, cfg.task_name)
    if found is None:
        log.info("resume=auto: no last.pt under %s/%s/runs, starting fresh", cfg.paths.log_dir, cfg.task_name)
        return
    with open_dict(cfg):
        cfg.ckpt_path = str(found)
    log.info("resume=auto: resuming from %s", found)


def run(cfg: DictConfig) -> float:
    import torch

    from lab import checkpoint as ckpt
    from lab import distributed, export
    from lab.data import build_data, build_loaders
    from lab.loggers import LoggerFanOut, build_loggers, flatten
    from lab.models import build_model
    from lab.monitor import build_monitor
    from lab.optim import build_optimizer, build_schedulers
    from lab.redact import install_log_filter, redact, scrub_hydra_dir
    from lab.runtime import check_launch_env, check_writable, resolve_device, run_info, seed_everything
    from lab.trainer import Trainer

    resolve_resume(cfg)
    validate(cfg)
    check_launch_env()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    config = redact(resolved)  # what gets printed, logged and saved
    scrub_hydra_dir(output_dir, resolved)
    install_log_filter(resolved)
    device = resolve_device(cfg.trainer.device)
    ddp, device = distributed.setup(cfg.trainer, device)  # one process, or one rank of a torchrun job
    main_rank = ddp.is_main  # only rank 0 prints, logs and writes files
    if cfg.get("print_config", True) and main_rank:
        print_config(config)
    if str(cfg.trainer.precision) == "16-mixed" and device.type != "cuda":
        raise UserError(f"16-mixed precision needs a CUDA GPU, this run is on {device.type}",
                        "trainer.precision", "use trainer.precision=bf16 or 32")  # fmt: skip
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    resume = ckpt.load(cfg.ckpt_path) if cfg.ckpt_path else None  # fail fast on a bad file

    splits = build_data(cfg.dataset)
    loaders = build_loaders(splits, cfg.dataset, device, cfg.trainer.seed, ddp.rank, ddp.world_size)
    model = build_model(cfg.model)
    if ddp.enabled and getattr(model, "unfreeze_at_epoch", None) is not None:
        raise UserError("DistributedDataParallel is built once, with the parameters that train from the start",
                        "model.unfreeze_at_epoch", "under torchrun use model.unfreeze_at_epoch=null (and "
                        "model.freeze=false to fine-tune everything), or train on one process")  # fmt: skip
    if resume is not None:
        ckpt.restore_model(model, resume, f"ckpt_path={cfg.ckpt_path}", cfg.checkpoint.strict)
        if hasattr(model, "set_epoch"):  # e.g. a backbone unfrozen by then: the optimizer must have its group
            model.set_epoch(resume["epoch"])
    model.to(device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    input_shape = (1, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    summary = model_summary(model, input_shape, device) if main_rank else ""
    if main_rank:
        (output_dir / "model_summary.txt").write_text(summary + "\n")
        log.info("model summary:\n%s", summary)
        write_json(output_dir / "run_info.json", run_info())
        write_json(output_dir / "class_names.json", {"class_names": splits.class_names})
    forward_model = None
    if hasattr(model, "can_cache_features"):
        from lab.data.features import cached_loaders, use_cache

        if use_cache(model, splits):  # a frozen backbone: compute its features once, train the head on them
            loaders = cached_loaders(
                model, splits, cfg.dataset, device, cfg.trainer.seed, ddp.rank, ddp.world_size,
                cache_dir=cfg.paths.get("feature_cache"),  # shared by runs and sweep jobs (null: in memory only)
            )  # fmt: skip
            forward_model = model.head

    optimizer = build_optimizer(cfg.optimizer, model)
    num_batches = len(loaders["train"])
    schedulers = build_schedulers(cfg.scheduler, optimizer, num_batches, cfg.trainer.max_epochs)
    checkpoint_cfg = OmegaConf.to_container(cfg.checkpoint, resolve=True)
    if not main_rank:
        checkpoint_cfg |= {"save_last": False, "save_top_k": 0}
    checkpointer = ckpt.Checkpointer(**checkpoint_cfg)
    if cfg.train and checkpointer.enabled and main_rank:
        check_writable(checkpointer.dirpath, "checkpoint.dirpath")  # not after the first epoch
    loggers = build_loggers(cfg.get("logger")) if main_rank else LoggerFanOut({})
    if not main_rank:
        cfg.trainer.progress_bar = False
    callbacks = [
        *getattr(model, "callbacks", list)(),
        *build_monitor(cfg.get("monitor"), cfg.dataset, splits.class_names),
    ]
    if ddp.enabled:  # gradients all-reduced in backward; trainer.model stays the plain module
        forward_model = ddp.wrap(forward_model or model)
    trainer = Trainer(
        cfg.trainer, model, optimizer, schedulers, loaders, loggers, checkpointer, device,
        checkpoint_extra=lambda: {"config": config, "class_names": splits.class_names,
                                  "loggers": loggers.state_dict()},
        callbacks=callbacks, forward_model=forward_model,
        reduce=ddp.all_reduce_sum if ddp.enabled else None,
    )  # fmt: skip
    if resume is not None and cfg.train and not ckpt.is_resumable(resume):
        log.info("ckpt_path=%s holds weights only: training starts from them at epoch 0", cfg.ckpt_path)
    elif resume is not None and cfg.train:
        trainer.load_checkpoint_state(resume)
        loggers.resume(trainer.state.global_step, resume.get("loggers") or {})
        log.info(
            "resumed from %s at epoch %d, step %d",
            cfg.ckpt_path,
            trainer.state.epoch,
            trainer.state.global_step,
        )

    status = "failed"
    try:
        loggers.log_config(config)
        loggers.watch(
            getattr(forward_model, "module", forward_model) or model
        )  # the module that runs: the head alone on cached features
        loggers.log_text("config", OmegaConf.to_yaml(config))
        loggers.log_text("model_summary", summary)
        if cfg.train:
            trainer.fit()
        ddp.barrier()  # rank 0 has written best.pt
        # Final evaluation on the best weights (last ones when no best.pt was written).
        if cfg.train and checkpointer.best_path.is_file():
            ckpt.restore_model(model, ckpt.load(checkpointer.best_path), str(checkpointer.best_path))
        metrics = trainer.evaluate("val", cfg.trainer.limit_val_batches)
        if cfg.test:
            metrics |= trainer.evaluate("test", cfg.trainer.limit_test_batches)
        trainer.callback("on_final_evaluation", metrics)
        best = trainer.state.best if trainer.state.best is not None else metrics.get(checkpointer.monitor)
        loggers.log_metrics({f"final/{k}": v for k, v in metrics.items()}, trainer.state.global_step)
        loggers.log_hparams(flatten(config), {f"final/{k}": v for k, v in metrics.items()})
        summary_metrics = {
            **metrics,
            "monitor": checkpointer.monitor,
            "mode": checkpointer.mode,
            "best": best,
            "epochs": trainer.state.epoch,
            "global_step": trainer.state.global_step,
            "status": "success",
        }
        if main_rank:
            write_json(output_dir / "metrics.json", summary_metrics)
            export.maybe_export(cfg, checkpointer.best_path, loggers)  # `export=[...]`: best.pt → export/
        log.info("final: %s", "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        status = "success"
    except BaseException as e:
        from lab.trainer import TrainingInterrupted

        status = "interrupted" if isinstance(e, (TrainingInterrupted, KeyboardInterrupt)) else "failed"
        raise
    finally:
        try:
            checkpointer.close()  # a checkpoint still being written is completed, whatever happened
        finally:
            loggers.close(status)
            log.info("loggers closed (%s)", status)
            ddp.close(success=status == "success")
    return float(best) if best is not None else math.nan
