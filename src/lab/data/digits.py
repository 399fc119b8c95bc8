"""scikit-learn's bundled 8x8 handwritten digits (1,797 real images): the default dataset, no download.

Read straight from the CSV that ships inside scikit-learn: `import sklearn.datasets` alone costs about a second.
"""

from __future__ import annotations

import gzip
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch


def _load_array() -> np.ndarray:
    spec = find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        with gzip.open(csv, "rt") as f:
            return np.loadtxt(f, delimiter=",", dtype=np.float32)
    from sklearn.datasets import load_digits  # the file moved: take the slow, official path

    bunch = load_digits()
    return np.concatenate([bunch.data, bunch.target[:, None]], axis=1).astype(np.float32)


class Digits(torch.utils.data.Dataset):
    """Same shape as torchvision's MNIST: `data` (N, 8, 8) in [0, 1], `targets`, `classes`.

    Digits has no official test split; `lab.data` carves one out with `dataset.test_fraction`.
    """

    classes = [str(i) for i in range(10)]

    def __init__(self) -> None:
        array = _load_array()
        self.data = torch.from_numpy(array[:, :64] / 16.0).reshape(-1, 8, 8)
        self.targets = torch.from_numpy(array[:, 64]).long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data[index], int(self.targets[index])
