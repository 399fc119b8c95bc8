"""Optimizer and LR schedulers from `conf/optimizer/*.yaml` and `conf/scheduler/*.yaml`.

Both configs `_target_` torch's own classes with `_partial_: true`; this file only binds them to the model's
trainable parameters (in groups: see `param_groups`) and adds an optional linear warm-up, chained in front of the
scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lab.config import build
from lab.errors import UserError

# Keys of a scheduler / optimizer config that are ours, not the torch class's.
SCHEDULER_KEYS = ("interval", "warmup_steps", "monitor")
OPTIMIZER_KEYS = ("no_weight_decay", "layer_decay")
# Parameters of these modules get no weight decay with `optimizer.no_weight_decay` (nor does any 1-d parameter).
NO_DECAY_MODULES = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm, nn.Embedding,
    nn.EmbeddingBag,
)  # fmt: skip


def trainable_parameters(model: nn.Module) -> list[dict[str, Any]]:
    """Parameter groups for the optimizer: frozen parameters are never handed to it.

    A model may define `param_groups()` (e.g. a backbone with its own lr scale); otherwise one group.
    """
    if hasattr(model, "param_groups"):
        return model.param_groups()
    return [{"params": [p for p in model.parameters() if p.requires_grad], "name": "all"}]


def layers(model: nn.Module) -> list[nn.Module]:
    """What `optimizer.layer_decay` counts, input to output: the blocks `model.freeze` counts (of `features`, for
    models with `features` and `head`), then the head."""
    from lab.models.backbone import blocks

    if isinstance(getattr(model, "features", None), nn.Module) and isinstance(
        getattr(model, "head", None), nn.Module
    ):
        return [*blocks(model.features), model.head]
    return blocks(model)


def no_decay_ids(model: nn.Module) -> set[int]:
    """Norm layers, embeddings and biases (every parameter with at most one dimension), as timm and torchvision's
    references exclude them from weight decay."""
    found = {id(p) for p in model.parameters() if p.ndim <= 1}
    for module in model.modules():
        if isinstance(module, NO_DECAY_MODULES):
            found |= {id(p) for p in module.parameters(recurse=False)}
    return found


def param_groups(
    model: nn.Module, weight_decay: float, no_weight_decay: bool = False, layer_decay: float | None = None
) -> list[dict[str, Any]]:
    """The model's groups (`trainable_parameters`), split by layer for `layer_decay` (lr x layer_decay^k for the
    layer k places below the head, times the group's own `lr_scale`) and into `.no_decay` groups (weight_decay 0)
    for `no_weight_decay` when the optimizer has weight decay at all. Names: `<group>[.layer<i>][.no_decay]`."""
    groups = [g for g in trainable_parameters(model) if g["params"]]
    split_decay = no_weight_decay and weight_decay != 0
    if not split_decay and layer_decay is None:
        return groups
    excluded = no_decay_ids(model) if split_decay else set()
    units = layers(model) if layer_decay is not None else []
    layer_of = {id(p): i for i, unit in enumerate(units) for p in unit.parameters()}
    result = []
    for group in groups:
        buckets: dict[tuple[int | None, bool], list[nn.Parameter]] = {}
        for p in group["params"]:
            layer = layer_of.get(id(p), 0) if units else None
            buckets.setdefault((layer, id(p) not in excluded), []).append(p)
        for (layer, decay), params in buckets.items():
            sub = {**group, "params": params}
            if layer is not None:
                sub["name"] += f".layer{layer}"
                sub["lr_scale"] = group.get("lr_scale", 1.0) * layer_decay ** (len(units) - 1 - layer)
            if not decay:
                sub["name"] += ".no_decay"
                sub["weight_decay"] = 0.0
            result.append(sub)
    return result


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    # Types and ranges of lab's own keys: `OptimizerOptions` / `SchedulerOptions` in lab.config (validate).
    no_weight_decay, layer_decay = bool(cfg.get("no_weight_decay", False)), cfg.get("layer_decay")
    groups = param_groups(model, cfg.get("weight_decay", 0.0) or 0.0, no_weight_decay, layer_decay)
    if not groups:
        raise UserError("the model has no trainable parameters", "model.freeze", "unfreeze at least the head")
    args = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in OPTIMIZER_KEYS}
    optimizer = build(OmegaConf.create(args), "optimizer", groups)
    for group in optimizer.param_groups:  # e.g. a backbone's discriminative lr (lab.models.backbone)
        group["lr"] *= group.get("lr_scale", 1.0)
    return optimizer


@dataclass
class Schedulers:
    """`main` steps every `interval` (epoch or step); `warmup` steps per optimizer step for `warmup_steps`."""

    main: Any = None
    warmup: Any = None
    interval: str = "epoch"
    warmup_steps: int = 0
    monitor: str | None = None  # ReduceLROnPlateau's metric

    def step_after_optimizer(self, global_step: int) -> None:
        if self.warmup is not None and global_step <= self.warmup_steps:
            self.warmup.step()
        if self.main is not None and self.interval == "step":
            self.main.step()

    def step_after_epoch(self, metrics: dict[str, float]) -> None:
        if self.main is None or self.interval != "epoch":
            return
        if isinstance(self.main, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if self.monitor in metrics:
                self.main.step(metrics[self.monitor])
        else:
            self.main.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "main": self.main.state_dict() if self.main is not None else None,
            "warmup": self.warmup.state_dict() if self.warmup is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("main", "warmup"):
            if getattr(self, name) is not None and state.get(name) is not None:
                getattr(self, name).load_state_dict(state[name])


def build_schedulers(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Schedulers:
    """The scheduler of `cfg` on `optimizer`; `total_steps`: the optimizer steps the run takes
    (`lab.trainer.optimizer_steps`: accumulation, `limit_train_batches` and `max_steps` counted)."""
    args = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in SCHEDULER_KEYS}
    interval = str(cfg.get("interval", "epoch"))
    warmup_steps = int(cfg.get("warmup_steps") or 0)
    main = None
    if args.get("_target_"):
        if "total_steps" in args and args["total_steps"] is None:  # OneCycleLR: known only now
            args["total_steps"] = total_steps
        if "max_lr" in args and isinstance(args["max_lr"], (int, float)):
            # OneCycleLR: one peak per parameter group, scaled like the group's lr (backbone_lr_scale,
            # layer_decay), so discriminative learning rates hold through the cycle.
            args["max_lr"] = [args["max_lr"] * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
            args["_convert_"] = "all"  # a list, not OmegaConf's ListConfig
        main = build(OmegaConf.create(args), "scheduler", optimizer)
    warmup = None
    if warmup_steps:  # lr x (step + 1) / warmup_steps for the first warmup_steps steps
        warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1 / warmup_steps, total_iters=max(warmup_steps - 1, 1)
        )
    return Schedulers(main, warmup, interval, warmup_steps, cfg.get("monitor"))
