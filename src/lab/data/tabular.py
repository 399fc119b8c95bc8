"""Tables that scikit-learn bundles (no download): diabetes (regression), wine, iris, breast_cancer. → `conf/dataset/`

The same attributes as torchvision's in-memory datasets: `data` (N, features) float32, `targets` (N,) and, for
classification, `classes`. Features are standardised by `lab.data.build_data` with the training split's statistics.
"""

from __future__ import annotations

import numpy as np
import torch


class SklearnTable(torch.utils.data.Dataset):
    def __init__(self, name: str) -> None:
        """`name`: a `sklearn.datasets.load_<name>` loader. Raw values: lab standardises features
        (`dataset.standardize`) and regression targets (`dataset.standardize_targets`) with the training split's
        statistics, which travel with the checkpoint."""
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, f"load_{name}")()
        self.data = torch.as_tensor(np.asarray(bunch.data, dtype=np.float32))
        self.feature_names = [str(n) for n in bunch.feature_names]
        target = np.asarray(bunch.target)
        if np.issubdtype(target.dtype, np.integer):  # classification
            self.targets = torch.as_tensor(target, dtype=torch.long)
            self.classes = [str(c) for c in bunch.get("target_names", sorted(set(target.tolist())))]
        else:
            self.targets = torch.as_tensor(target.astype(np.float32))
            self.target_names = ["target"]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index], self.targets[index]
