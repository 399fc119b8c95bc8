"""Data-parallel runs of the loop, built in Python: `torchrun --nproc_per_node=2 tests/ddp_loop.py OUT` (gloo on the
CPU) writes one file per scenario and rank to OUT; `tests/test_ddp_loop.py` starts it as two forked ranks
(`conftest.forked_ranks`, torchrun's environment) and compares. The functions also run in one process (rank 0 of 1),
the reference of the comparisons."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lab import Callback
from lab.config import TrainerConfig
from lab.data.loaders import InMemoryLoader
from lab.loggers import Logger, LoggerFanOut
from lab.trainer import Trainer

FEATURES, CLASSES, SAMPLES = 8, 4, 64


def task():
    from lab.tasks.classification import Classification
    from lab.tasks.metrics import MulticlassAccuracy

    acc = MulticlassAccuracy(num_classes=CLASSES)
    return Classification(nn.CrossEntropyLoss(), {"acc": acc}, input_shape=[FEATURES], num_classes=CLASSES)


def data(images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    y = (x @ torch.randn(FEATURES, CLASSES, generator=g)).argmax(1)
    return (x.view(SAMPLES, 1, 2, 4).repeat(1, 1, 2, 1) if images else x), y


def loaders(batch_size: int, rank: int, world_size: int, images: bool = False) -> dict[str, InMemoryLoader]:
    x, y = data(images)
    return {
        "train": InMemoryLoader(x, y, batch_size, shuffle=True, seed=0, rank=rank, world_size=world_size),
        "val": InMemoryLoader(x, y, 16, shuffle=False, rank=rank, world_size=world_size),
    }


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES))


class Recording(Logger):
    """Every `log_metrics` call with the time it came."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, int, dict[str, float]]] = []

    def log_metrics(self, metrics, step: int) -> None:
        self.calls.append((time.perf_counter(), step, dict(metrics)))


def accumulation(
    distributed: Any, rank: int, world_size: int, batch_size: int, accumulate: int
) -> dict[str, Any]:
    """Two epochs of SGD, `accumulate` batches of `batch_size` per step and rank; counts DDP's all-reduces."""
    model = mlp()
    trainer = Trainer(model, task(), loaders(batch_size, rank, world_size), torch.optim.SGD(model.parameters(), lr=0.5),
                      TrainerConfig(max_epochs=2, accumulate_grad_batches=accumulate, progress_bar=False,
                                    log_every_n_steps=2), distributed=distributed, loggers=LoggerFanOut({"rec": Recording()}))  # fmt: skip
    reductions = []
    if trainer.network.ddp is not None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting(state, bucket):
            reductions.append(bucket.index())
            return allreduce_hook(state, bucket)

        trainer.network.ddp.register_comm_hook(None, counting)
    trainer.fit()
    logged = trainer.loggers.loggers["rec"].calls
    return {"model": model.state_dict(), "steps": trainer.state.global_step, "reductions": len(reductions),
            "logged": [(t, step, m) for t, step, m in logged if "train/samples_per_sec" in m],
            "local_samples": batch_size * accumulate * 2}  # fmt: skip


class PoisonedOnRank1:
    """Rank 1's training batches, its third one made of infinities (rank 0's stay clean)."""

    def __init__(self, loader: InMemoryLoader, rank: int) -> None:
        self.loader, self.rank = loader, rank

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, start: int, stop: int | None):
        for index, (x, y) in enumerate(self.loader.batches(start, stop), start=start):
            yield (torch.full_like(x, float("inf")) if self.rank == 1 and index == 2 else x), y


def nan_on_one_rank(distributed: Any, rank: int, world_size: int) -> dict[str, Any]:
    model = mlp()
    data_loaders = loaders(8, rank, world_size)
    data_loaders["train"] = PoisonedOnRank1(data_loaders["train"], rank)
    trainer = Trainer(model, task(), data_loaders, torch.optim.Adam(model.parameters(), lr=0.01),
                      TrainerConfig(max_epochs=1, nan_policy="skip", progress_bar=False), distributed=distributed)  # fmt: skip
    trainer.fit()
    return {"model": model.state_dict(), "skipped": trainer.skipped_steps, "steps": trainer.state.global_step}


def batchnorm_and_ema(distributed: Any, rank: int, world_size: int) -> dict[str, Any]:
    """The default model (BatchNorm) with EMA: every rank must end with the same tensors and validation."""
    from lab.callbacks.ema import EMA
    from lab.models.simple import SimpleCNN

    torch.manual_seed(0)
    model = SimpleCNN(in_channels=1, num_classes=CLASSES, width=4, dropout=0.0)
    ema = EMA(decay=0.9, warmup=False)
    trainer = Trainer(model, task(), loaders(8, rank, world_size, images=True),
                      torch.optim.SGD(model.parameters(), lr=0.1), TrainerConfig(max_epochs=2, progress_bar=False),
                      distributed=distributed, callbacks={"ema": ema})  # fmt: skip
    trainer.fit()  # `evaluate_with: ema` loads the averages into the model at the end: keep both apart
    return {"model": model.state_dict(), "ema": ema.state_dict()["weights"], "val": trainer.val_metrics}


class SignalOnRank1(Callback):
    """A real SIGTERM to rank 1 alone, right after its optimizer step 2 (rank 0 gets none)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_optimizer_step(self, trainer: Any) -> None:
        if self.rank == 1 and trainer.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def signal_on_one_rank(distributed: Any, rank: int, world_size: int) -> dict[str, Any]:
    """A stop signal on one rank: every rank must stop after the same step (else the other waits forever)."""
    from lab.trainer import TrainingInterrupted

    model = mlp()
    trainer = Trainer(model, task(), loaders(8, rank, world_size), torch.optim.SGD(model.parameters(), lr=0.5),
                      TrainerConfig(max_epochs=2, progress_bar=False), distributed=distributed,
                      callbacks={"signal": SignalOnRank1(rank)})  # fmt: skip
    try:
        trainer.fit()
        stopped_by = None
    except TrainingInterrupted as e:
        stopped_by = e.signum
    return {"model": model.state_dict(), "steps": trainer.state.global_step, "stopped_by": stopped_by}


def main(out: Path) -> None:
    from lab.distributed import setup

    torch.set_num_threads(1)
    distributed, _ = setup(TrainerConfig(strategy="ddp"), torch.device("cpu"))
    rank, world_size = distributed.rank, distributed.world_size
    results = {
        "accumulation": accumulation(distributed, rank, world_size, batch_size=4, accumulate=2),
        "nan": nan_on_one_rank(distributed, rank, world_size),
        "batchnorm": batchnorm_and_ema(distributed, rank, world_size),
        "signal": signal_on_one_rank(distributed, rank, world_size),
    }
    torch.save(results, out / f"rank{rank}.pt")
    distributed.close(success=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
