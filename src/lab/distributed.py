"""Multi-process data parallel training on PyTorch's own engine: `torchrun --nproc_per_node=N train.py trainer=ddp`.

torchrun starts N copies of `train.py` and tells each its place through the environment (`RANK`, `LOCAL_RANK`,
`WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`); nothing is read from the command line (Hydra would reject
`--local_rank`). Before Hydra composes the config, `agree_on_run()` makes every rank use rank 0's run id and
start time, so that all ranks resolve the same run dir (hydra issue 2070). `setup()` picks the device (GPU
`LOCAL_RANK`) and the process group backend (nccl on CUDA, gloo on the CPU); the loop then sees a
`DistributedDataParallel` model (or, with `trainer.strategy=fsdp`, one sharded by `lab.fsdp`), sharded loaders and
an all-reduce for its metrics. Only rank 0 logs, prints and writes files.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch
import torch.distributed as dist

from lab.config import TrainerConfig
from lab.errors import EXIT_USER_ERROR, UserError

log = logging.getLogger(__name__)


# Hydra overrides for ranks > 0: no `.hydra/` and no `train.log` of their own (Hydra still creates the run dir's
# path). Rank 0 writes both; on several nodes, the other nodes write no file.
WRITES_NOTHING = ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]",
                  "++hydra.job_logging.handlers.file.delay=true"]  # fmt: skip


def world_size() -> int:
    from lab.runtime import check_launch_env

    return check_launch_env()[1]


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _init_process_group() -> None:
    """Join torchrun's process group; a bad or incomplete launch environment is a `UserError`, not a hang."""
    if dist.is_initialized():
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise UserError(f"{' and '.join(missing)} not set", "WORLD_SIZE > 1",
                        "launch with torchrun --nproc_per_node=N, which sets them")  # fmt: skip
    # DistributedDataParallel imports torch.distributed.nn, whose functions take `group=group.WORLD` as a default
    # argument: imported after the group exists, they would keep it alive to the end (see Distributed.close).
    import torch.distributed.nn

    try:
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"  # nccl for the gradients, gloo for small host objects
        store = _attempt_store()
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(
                backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size()
            )
    except (RuntimeError, ValueError) as e:
        raise UserError(f"torch.distributed could not start: {str(e).splitlines()[0]}", "torchrun",
                        "check MASTER_ADDR/MASTER_PORT and that every rank was started") from None  # fmt: skip


def agree_on_run() -> None:
    """Under torchrun: export rank 0's `LAB_RUN_ID` and `LAB_RUN_TIME` to every rank; a no-op otherwise.

    Called before `@hydra.main`, so `${run_id:}` and `${run_time:...}` in the run dir resolve the same everywhere.
    A bad launch environment ends the process here with one line and exit code 2.
    """
    try:
        _agree_on_run()
    except UserError as e:
        e.exit()


def refuse_multirun(argv: list[str]) -> None:
    """`torchrun ... train.py -m` would run one sweeper per rank (and hang): one line that says what to use."""
    if {"-m", "--multirun"} & set(argv):
        if int(os.environ.get("RANK", "0")) == 0:
            print(UserError("a sweep (-m) under torchrun runs one sweeper per process", "torchrun ... train.py -m",
                            "run the sweep without torchrun and give each job its own torchrun group: "
                            "python train.py -m hydra/launcher=torchrun hydra.launcher.nproc_per_node=N ...").line(),
                  file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(EXIT_USER_ERROR)


def _agree_on_run() -> None:
    if world_size() <= 1 or (os.environ.get("LAB_RUN_ID") and os.environ.get("LAB_RUN_TIME")):
        return
    from lab.resolvers import run_id

    _init_process_group()
    agreed = [run_id(), os.environ.get("LAB_RUN_TIME") or datetime.now().isoformat()]
    if dist.get_rank() == 0:
        agreed = _kept_across_restarts(agreed)
    dist.broadcast_object_list(agreed, src=0)
    os.environ["LAB_RUN_ID"], os.environ["LAB_RUN_TIME"] = agreed
    import lab.resolvers

    lab.resolvers._RUN_ID = agreed[0]  # in case it was already resolved on this rank


def restarted() -> bool:
    """A group that `torchrun --max-restarts=N` started again after a worker failed."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def _agent_store() -> dist.Store | None:
    """torchrun's key-value store (at MASTER_ADDR:MASTER_PORT), which its agent keeps for its whole life, restarts
    included, while each restarted worker is a new process; None when not started by torchrun's agent."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(minutes=5))  # fmt: skip


def _attempt_store() -> dist.Store | None:
    """The agent's store under a prefix of its own for each restart: the keys a process group leaves (gloo's
    addresses) would otherwise still be there for the restarted group, which would connect to dead workers."""
    store = _agent_store()
    if store is None:
        return None
    return dist.PrefixStore(f"lab/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _kept_across_restarts(fresh: list[str]) -> list[str]:
    """The run id and time of this torchrun job's first group (`fresh`, recorded for the next, in the first)."""
    store = _agent_store()
    if store is None:
        return fresh  # not started by torchrun's agent: nothing outlives this group
    # Atomic: the first group's value stays, a restarted group's `fresh` is not written.
    return store.compare_set("lab/run", "", "\n".join(fresh)).decode().split("\n")


@dataclass
class Distributed:
    """This process's place in the job: world_size 1 and rank 0 for a plain `python train.py`."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    sync_batchnorm: bool = False
    find_unused_parameters: bool = False
    strategy: str = "auto"  # auto and ddp: DistributedDataParallel; fsdp: FSDP2 (lab.fsdp)
    trainer: TrainerConfig | None = None  # the settings of fsdp (trainer.fsdp, trainer.precision)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    def shard(self, cfg: Any, model: torch.nn.Module) -> None:
        """fsdp: refuse what it cannot run, then shard `model` in place (before its optimizer is built, over the
        shards); a no-op for the other strategies. `cfg`: the whole composed config."""
        if not self.fsdp:
            return
        from lab import fsdp

        fsdp.refuse_unsupported(cfg, model, self.world_size, self.device or torch.device("cpu"))
        fsdp.shard(model, self.trainer.fsdp, str(self.trainer.precision), self.device)

    def sharded_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
        """fsdp: the checkpoints' sharded part (`lab.fsdp.ShardedState`); None otherwise."""
        if not self.fsdp:
            return None
        from lab.fsdp import ShardedState

        return ShardedState(model, optimizer, self.trainer.fsdp.async_save)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """`DistributedDataParallel` around the plain model (checkpoints keep saving the plain one); under fsdp the
        model itself, sharded by `shard`."""
        if not self.enabled:
            return model
        if self.fsdp:
            from lab.fsdp import is_sharded

            if not is_sharded(model):
                raise ValueError(
                    "trainer.strategy=fsdp: shard the model (Distributed.shard) before its optimizer"
                )
            return model
        from torch.nn.parallel import DistributedDataParallel

        on_cuda = self.device is not None and self.device.type == "cuda"
        if self.sync_batchnorm and on_cuda:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(
            model,
            device_ids=[self.device.index] if on_cuda else None,
            find_unused_parameters=self.find_unused_parameters,
            # Buffers (BatchNorm statistics) are broadcast once per optimizer step by the loop (`broadcast`),
            # not before every forward: with accumulation that is fewer collectives, and every rank ends each
            # step, so validates, averages and saves, with rank 0's.
            broadcast_buffers=False,
        )

    @staticmethod
    def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    @staticmethod
    def most(count: int) -> int:
        """The largest `count` of all ranks."""
        value = torch.tensor([count])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value)

    @staticmethod
    def broadcast(tensors: list[torch.Tensor]) -> None:
        """Rank 0's values into `tensors` on every rank, in place: one collective per dtype."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            offset = 0
            for tensor in group:
                tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self, success: bool) -> None:
        """Tear the group down while Python is fully alive; after a success, first wait until every rank is done
        with its collectives. After a failure there is no barrier: the other ranks may be stuck in a collective,
        torchrun stops them.

        Call it once nothing references the `DistributedDataParallel` wrapper any more: the wrapper holds the
        group, and a gloo group that outlives `destroy_process_group` keeps its threads running until interpreter
        shutdown, where they abort a finished rank at random ("terminate called without an active exception",
        exit code -6: a successful job reported as failed).
        """
        if self.enabled and dist.is_initialized():
            try:
                if success:
                    dist.barrier()
            finally:
                gc.collect()  # wrappers left in reference cycles go now, not at interpreter shutdown
                dist.destroy_process_group()


def setup(cfg: TrainerConfig, device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group when started by torchrun (`cfg` is `trainer`); returns this rank's place and device."""
    strategy = str(cfg.strategy)
    if strategy not in ("auto", "ddp", "fsdp"):
        raise UserError(f"unknown strategy {strategy!r}", "trainer.strategy", "use auto, ddp or fsdp")
    if world_size() <= 1:
        if strategy == "fsdp":
            # refused by `Distributed.shard`, after what fsdp cannot run in any number of processes
            return Distributed(device=device, strategy=strategy, trainer=cfg), device
        if strategy == "ddp":
            raise UserError(
                "trainer=ddp needs one process per device, started by torchrun",
                "trainer.strategy=ddp",
                "run `torchrun --nproc_per_node=N train.py trainer=ddp` (or `make train-ddp NPROC=N`)",
            )
        return Distributed(device=device), device
    _init_process_group()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank() % torch.cuda.device_count())
    elif cfg.sync_batchnorm:
        log.warning(
            "trainer.sync_batchnorm needs CUDA: BatchNorm statistics stay per process on %s", device.type
        )
    info = Distributed(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=device,
        sync_batchnorm=cfg.sync_batchnorm,
        find_unused_parameters=cfg.find_unused_parameters,
        strategy=strategy,
        trainer=cfg,
    )
    if not info.is_main:
        quiet()
    return info, device


def quiet() -> None:
    """Non-zero ranks: warnings and errors only, on the console; train.log is rank 0's."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)
