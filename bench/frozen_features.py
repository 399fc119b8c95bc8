"""Per-epoch time of a frozen backbone with and without `model.cache_features` (no timed tests; run by hand).

    PYTHONPATH=src python bench/frozen_features.py [--model resnet18] [--images 256] [--size 224] [--epochs 3]

Random-init weights (weights=None: speed does not depend on the values) and generated images. "uncached" is what
an epoch costs with `cache_features=false` (the frozen backbone runs under no_grad every epoch, the head trains),
"cached" an epoch on stored features after a one-time extraction, which is reported separately.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

from lab.data import DataSplits
from lab.data.features import cached_loaders
from lab.data.loaders import InMemoryLoader
from lab.models.backbone import Backbone


def epoch_time(model: torch.nn.Module, loader: InMemoryLoader, optimizer: torch.optim.Optimizer) -> float:
    model.train()
    start = time.perf_counter()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")
    x = torch.randn(args.images, 3, args.size, args.size)
    y = torch.randint(0, args.classes, (args.images,))
    model = Backbone(args.model, args.classes, weights=None, freeze=True)

    optimizer = torch.optim.Adam(model.head.parameters(), lr=1e-3)
    loader = InMemoryLoader(x, y, args.batch_size, shuffle=True)
    uncached = [epoch_time(model, loader, optimizer) for _ in range(args.epochs)]

    tiny = TensorDataset(x[:1], y[:1])  # val/test: not timed
    splits = DataSplits(TensorDataset(x, y), tiny, tiny, class_names=[str(i) for i in range(args.classes)])
    data_cfg = OmegaConf.create({"batch_size": args.batch_size, "num_workers": 0})
    start = time.perf_counter()
    train_loader = cached_loaders(model, splits, data_cfg, device, seed=0)["train"]
    extraction = time.perf_counter() - start
    cached = [epoch_time(model.head, train_loader, optimizer) for _ in range(args.epochs)]

    best_uncached, best_cached = min(uncached), min(cached)
    print(f"{args.model} frozen, {args.images} images {args.size}x{args.size}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} CPU threads, best of {args.epochs} epochs")  # fmt: skip
    print(f"  uncached epoch   {best_uncached:8.3f} s")
    print(f"  cached epoch     {best_cached:8.3f} s   (one-time feature extraction {extraction:.2f} s)")
    print(f"  speed-up/epoch   {best_uncached / best_cached:8.0f}x")


if __name__ == "__main__":
    main()
