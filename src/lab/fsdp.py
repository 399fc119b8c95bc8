"""Fully sharded data parallel (FSDP2): `torchrun --nproc_per_node=N train.py trainer=fsdp`.

`shard()` applies `torch.distributed.fsdp.fully_shard` to each block of the model (modules whose class is named in
`trainer.fsdp.blocks`, outermost first), then to the root, which holds what no block does. Every parameter becomes
a DTensor of which each rank keeps one shard; a block's parameters are gathered for its forward and backward and
its gradients reduce-scattered, so the optimizer (built afterwards, over the shards) keeps a shard of its state
too. `trainer.precision` bf16/bf16-mixed becomes FSDP's `MixedPrecisionPolicy` (bf16 parameters and compute,
fp32 gradient reduction and outputs) instead of autocast.

Checkpoints: every rank writes its shards of the model and the optimizer with `torch.distributed.checkpoint` (DCP)
into `checkpoints/sharded/step=<global step>/`, and rank 0 writes `last.pt` as in any run (the whole model, gathered
to its CPU, and the loop's state) with `sharded` naming that folder; resume reads the optimizer from there. A
folder is complete before the `last.pt` naming it is renamed into place, and the folder of the previous `last.pt`
is removed after. `best.pt` and the top-k files hold the whole model without the optimizer (weights only), so
`predict.py`, `export.py` and the final evaluation read them as any other run's.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from lab.config import FSDPConfig
from lab.errors import UserError

log = logging.getLogger(__name__)

SHARDED_DIR = "sharded"  # beside last.pt: one DCP folder per saved step, the newest named by last.pt


def is_sharded(model: nn.Module) -> bool:
    """Whether `fully_shard` was applied to `model` (its parameters are DTensors)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no model of this process is sharded
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def refuse_unsupported(cfg: DictConfig, model: nn.Module, world_size: int, device: torch.device) -> None:
    """What FSDP does not run, in one line each, before anything trains."""
    key = "trainer.strategy=fsdp"
    if getattr(model, "frozen", None):
        raise UserError("fsdp shards models that train end to end; this one has frozen blocks (their features "
                        "cached, or kept out of the optimizer)", "model.freeze",
                        "use model.freeze=false, or trainer=ddp for a frozen backbone")  # fmt: skip
    for name, node in (cfg.get("callbacks") or {}).items():
        if node and str(node.get("_target_", "")).endswith("ema.EMA"):
            raise UserError("the EMA callback averages whole weights, which no rank holds under fsdp",
                            f"callbacks.{name}", f"drop it (callbacks.{name}=null) or use trainer=ddp")  # fmt: skip
    if str(cfg.trainer.precision) == "16-mixed":
        raise UserError("fsdp runs bf16 as its mixed-precision policy; 16-mixed (a GradScaler) is not supported",
                        "trainer.precision", "use trainer.precision=bf16-mixed")  # fmt: skip
    if cfg.trainer.fsdp.cpu_offload and device.type != "cuda":
        raise UserError(f"CPU offload moves sharded state from the GPU to the CPU; this run is on {device.type}",
                        "trainer.fsdp.cpu_offload", "set trainer.fsdp.cpu_offload=false")  # fmt: skip
    if world_size <= 1:
        raise UserError("trainer=fsdp shards the model over several processes, started by torchrun", key,
                        "run `torchrun --nproc_per_node=N train.py trainer=fsdp` (N >= 2)")  # fmt: skip


def blocks(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The outermost submodules (not the root) whose class is named in `names` and that hold parameters."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if type(child).__name__ in names and any(True for _ in child.parameters()):
                found.append(child)
            else:
                visit(child)

    visit(model)
    return found


def shard(model: nn.Module, settings: FSDPConfig, precision: str, device: torch.device) -> None:
    """`fully_shard` each block, then the root, in place, over every rank of the default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    bf16 = precision in ("bf16", "bf16-mixed")
    policy = MixedPrecisionPolicy()
    if bf16:  # bf16 parameters and compute, fp32 gradient reduction and outputs (the loss is taken in fp32)
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32
        )
    options = {
        "mesh": mesh,
        "reshard_after_forward": settings.reshard_after_forward,
        "mp_policy": policy,
        "offload_policy": CPUOffloadPolicy() if settings.cpu_offload else OffloadPolicy(),
    }
    units = blocks(model, list(settings.blocks))
    counts = ", ".join(f"{name} x{n}" for name, n in Counter(type(u).__name__ for u in units).items())
    for unit in units:  # children before their parent: each call groups what is not in a group yet
        fully_shard(unit, **options)
    fully_shard(model, **options)
    log.info("fsdp: %d blocks (%s) and the root sharded over %d ranks%s%s", len(units), counts or "none",
             dist.get_world_size(), ", bf16 parameters and compute, fp32 reduction" if bf16 else "",
             ", offloaded to the CPU" if settings.cpu_offload else "")  # fmt: skip


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """A micro-batch before the last of its accumulation window: gradients stay whole and local, reduce-scattered
    with the last one's."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's plain state_dict on rank 0's CPU (every rank takes part; the others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool) -> None:
    """A plain state_dict (every rank holds it) into the sharded model: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str | Path) -> None:
    """Model and optimizer from a DCP folder, into this run's shards: at the world size that wrote it, another
    (DCP reshards), or in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():  # in one process DCP warns that it loads in one process, as meant
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


class ShardedState:
    """The part of `last.pt` each rank writes itself: its shards of the model and the optimizer (DCP)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, async_save: bool) -> None:
        import torch.distributed as dist

        self.model, self.optimizer = model, optimizer
        # async_save runs its collectives in a background thread: on a group of their own, not the training's.
        self.group = dist.new_group(backend="gloo") if async_save else None
        self.pending: Future | None = None

    def model_state(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.model)

    def save(self, dirpath: Path, global_step: int) -> str:
        """Every rank: a new DCP folder under `dirpath/sharded/`; returns its name relative to `dirpath`."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()
        name = [f"{SHARDED_DIR}/step={global_step:06d}"]
        if dist.get_rank() == 0:  # never into the folder a complete last.pt names (a second save at one step)
            taken = {p.name for p in (dirpath / SHARDED_DIR).glob("step=*")}
            base, n = Path(name[0]).name, 1
            while Path(name[0]).name in taken:
                name[0], n = f"{SHARDED_DIR}/{base}-{n}", n + 1
        dist.broadcast_object_list(name, src=0)
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        if self.group is None:
            dcp.save(state, checkpoint_id=str(dirpath / name[0]))
        else:  # the state is staged to the CPU before this returns; the files follow
            self.pending = dcp.async_save(
                state, checkpoint_id=str(dirpath / name[0]), process_group=self.group
            )
        return name[0]

    def wait(self) -> None:
        """Until this rank's part of the last save is written (on rank 0: the whole folder, its metadata last)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    @staticmethod
    def prune(dirpath: Path, keep: str) -> None:
        """Rank 0, once `last.pt` names `keep`: the other folders (earlier saves, an interrupted one) go."""
        for folder in (dirpath / SHARDED_DIR).glob("step=*"):
            if folder.name != Path(keep).name:
                shutil.rmtree(folder, ignore_errors=True)


def check_resumable(state: dict[str, Any], where: str) -> None:
    """An fsdp run resumes from an fsdp run's last.pt: a whole optimizer state does not fit its shards."""
    if "sharded" not in state:
        raise UserError("the checkpoint holds a whole optimizer state (written without fsdp), which fsdp does not "
                        "load", where, "resume it with the strategy that wrote it, or start from its weights: "
                        "ckpt_path=<run>/export/model.pt")  # fmt: skip
