"""`python bench/handwritten_run.py digits|wine`: the one-batch run a person would write by hand, for the start-up
comparison in bench.py. It imports torch (and, for the wine table, scikit-learn's loader, as lab does), loads the
same data as lab, splits it, trains one batch of the same model with Adam and validates once, then exits.

Digits is read from the CSV scikit-learn bundles, as lab reads it, so the baseline is not slowed down by
`import sklearn.datasets` (about a second) that lab avoids. The model classes are lab's own file, loaded by path so
that the `lab` package and its config machinery are not imported.
"""

from __future__ import annotations

import gzip
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]


def load_models():
    spec = importlib.util.spec_from_file_location(
        "simple_models", ROOT / "src" / "lab" / "models" / "simple.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    csv = Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(csv, "rt") as f:
        array = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(array[:, :64] / 16.0).reshape(-1, 1, 8, 8)
    return (x - 0.3053) / 0.3761, torch.from_numpy(array[:, 64]).long()


def wine() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_wine

    bunch = load_wine()
    x = torch.as_tensor(bunch.data, dtype=torch.float32)
    return (x - x.mean(0)) / x.std(0), torch.as_tensor(bunch.target, dtype=torch.long)


def main() -> None:
    name = sys.argv[1]
    x, y = digits() if name == "digits" else wine()
    models = load_models()
    if name == "digits":
        model, batch_size = models.SimpleCNN(in_channels=1, num_classes=10), 64
    else:
        model, batch_size = models.MLP(input_shape=(13,), num_outputs=3), 16
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = len(y) // 10
    train = DataLoader(TensorDataset(x[order[n_val:]], y[order[n_val:]]), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x[order[:n_val]], y[order[:n_val]]), batch_size=batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    inputs, targets = next(iter(train))
    loss = F.cross_entropy(model(inputs), targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for inputs, targets in val:
            correct += int((model(inputs).argmax(1) == targets).sum())
    print(f"loss {loss.item():.4f}  val acc {correct / n_val:.4f}")


if __name__ == "__main__":
    main()
