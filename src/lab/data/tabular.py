"""Tables: CSV files (`CSVTable`, `dataset=csv`) and those scikit-learn bundles (`SklearnTable`, no download:
diabetes (regression), wine, iris, breast_cancer). → `conf/dataset/`

The same attributes as torchvision's in-memory datasets: `data` (N, features) float32, `targets` (N,) and, for
classification, `classes`; a CSV table also `feature_names` (column order) and `target_names`. Features are standardised by `lab.data.build_data` with the training split's statistics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lab.errors import UserError


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


class CSVTable(torch.utils.data.Dataset):
    """A table from a CSV file: `target` (one column, or a list of 0/1 columns for multi-label), features the other
    columns or `features`. → `conf/dataset/csv.yaml`

    Read with pandas: it infers each column's type, handles quoting and the usual spellings of missing values, and
    is what most users already hold their tables in. Every cell is checked here, so that a missing value, a
    non-numeric feature or an infinity is reported as one line naming the file, line and column (not as NaN losses).

    One target column is read as classes when `num_classes` is given (strings or integers; `classes` are its
    sorted distinct values, targets their indices), else as real values (regression, float32). A list of target
    columns is a multi-label target: multi-hot float32 vectors, `classes` the column names.
    """

    def __init__(self, path: str, target: str | list[str], features: list[str] | None = None,
                 num_classes: int | None = None) -> None:  # fmt: skip
        frame, targets, features = read_table(path, target, features)
        where = Path(str(path)).name
        columns = [_numbers(frame[c], c, path).to_numpy(dtype=np.float32) for c in features]
        self.data = torch.as_tensor(np.stack(columns, axis=1))
        self.feature_names, self.target_names = list(features), list(targets)
        if isinstance(target, str) and num_classes is not None:
            _no_missing(frame[target], target, path)
            self.classes = table_classes(frame[target])
            index = {name: i for i, name in enumerate(self.classes)}
            self.targets = torch.as_tensor([index[str(v)] for v in _labels(frame[target])], dtype=torch.long)
        elif isinstance(target, str):
            self.targets = torch.as_tensor(_numbers(frame[target], target, path).to_numpy(dtype=np.float32))
        else:
            for column in targets:
                numbers = _numbers(frame[column], column, path)
                bad = ~numbers.isin([0, 1])
                if bad.any():
                    raise UserError(f"multi-label target column {column!r} holds {numbers[bad].iloc[0]!r}, not 0 or 1",
                                    f"{where}, line {_line(bad)}", "mark each label 0 or 1")  # fmt: skip
            self.classes = list(targets)
            self.targets = torch.as_tensor(frame[targets].to_numpy(dtype=np.float32))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index], self.targets[index]


def _line(mask) -> int:
    """The file line of the first True row (line 1 is the header)."""
    return int(np.flatnonzero(mask.to_numpy())[0]) + 2


def _labels(column):
    """Class labels as text; integer labels stored as floats by pandas (1.0) read as "1"."""
    if column.dtype.kind == "f" and (column.dropna() % 1 == 0).all():
        column = column.astype("Int64")
    return column.astype(str)


def table_classes(column) -> list[str]:
    """Sorted distinct labels of a class column: numerically when they are numbers, else as text."""
    labels = _labels(column)
    if column.dtype.kind in "iuf":
        return [str(v) for v in sorted(set(labels), key=float)]
    return sorted(set(labels))


def _no_missing(column, name: str, path: str) -> None:
    if column.isna().any():
        raise UserError(f"missing value in column {name!r}", f"{Path(str(path)).name}, line {_line(column.isna())}",
                        "fill the cell or drop the row")  # fmt: skip


def _numbers(column, name: str, path: str):
    """A column as float64, or one line naming the first missing, non-numeric or infinite cell."""
    import pandas as pd

    where = Path(str(path)).name
    _no_missing(column, name, path)
    numbers = pd.to_numeric(column, errors="coerce")
    if numbers.isna().any():
        bad = numbers.isna()
        raise UserError(f"non-numeric value {column[bad].iloc[0]!r} in column {name!r}", f"{where}, line {_line(bad)}",
                        "features must be numbers: encode the column, or leave it out of dataset.features")  # fmt: skip
    if np.isinf(numbers.to_numpy(dtype=np.float64)).any():
        bad = np.isinf(numbers)
        raise UserError(f"infinite value in column {name!r}", f"{where}, line {_line(bad)}",
                        "replace it with a finite number or drop the row")  # fmt: skip
    return numbers.astype(np.float64)


def read_table(path: str | None, target: str | list[str] | None, features: list[str] | None = None):
    """(frame, target columns, feature columns) of a CSV file, or one line on what is missing."""
    import pandas as pd

    if not path:
        raise UserError(
            "no CSV file given",
            "dataset.path",
            "python train.py dataset=csv dataset.path=<file.csv> dataset.target=<column>",
        )
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise UserError("CSV file not found", f"dataset.path={file}", "give the path of a .csv file")
    frame = pd.read_csv(file, skipinitialspace=True)
    columns = [str(c) for c in frame.columns]
    targets = [target] if isinstance(target, str) else [str(t) for t in target or []]
    if not targets:
        raise UserError("no target column given", "dataset.target", f"name one (or a list) of {columns}")
    features = [str(f) for f in features] if features else [c for c in columns if c not in targets]
    unknown = [c for c in [*targets, *features] if c not in columns]
    if unknown:
        key = "dataset.target" if unknown[0] in targets else "dataset.features"
        raise UserError(f"column {unknown[0]!r} is not in {file.name}", key, f"use one of {columns}")
    if not features:
        raise UserError(
            f"{file.name} has no feature columns besides the target", "dataset.features", "add columns"
        )
    return frame, targets, features


def describe(path: str | None, target, features=None) -> dict:
    """What the config needs before the data is read: `num_features`, and `num_classes` (a class column of strings
    or integers: its distinct labels; a list of columns: their number; real values: None)."""
    frame, targets, features = read_table(path, target, features)
    column = frame[targets[0]]
    if len(targets) > 1 or not isinstance(target, str):
        num_classes = len(targets)
    elif column.dtype.kind in "iuO" or column.dtype == "string" or (column.dropna() % 1 == 0).all():
        num_classes = len(table_classes(column.dropna()))
    else:
        num_classes = None
    return {"num_features": len(features), "num_classes": num_classes}
