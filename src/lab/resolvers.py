"""OmegaConf resolvers used by the configs (registered on `import lab`)."""

from __future__ import annotations

import os
import secrets
from datetime import datetime

from omegaconf import OmegaConf

_RUN_ID: str | None = None
_RUN_TIME: datetime | None = None


def run_id() -> str:
    """A short id that keeps two runs started in the same second apart (e.g. SLURM array jobs).

    `LAB_RUN_ID` wins when set, so that several processes (torchrun ranks, a relaunch) can agree on one run dir.
    """
    global _RUN_ID
    if _RUN_ID is None:
        _RUN_ID = os.environ.get("LAB_RUN_ID") or secrets.token_hex(3)
    return _RUN_ID


def weights_meta(name: str, weights: str | None, key: str):
    """`${weights_meta:resnet18,DEFAULT,mean}`: preprocessing of torchvision weights (imports torchvision).

    Lists come back as a `ListConfig`: `OmegaConf.resolve` (Hydra's `--cfg job --resolve`) rejects plain lists.
    """
    from omegaconf import ListConfig

    from lab.models.backbone import weights_meta

    value = weights_meta(name, weights, key)
    return ListConfig(value) if isinstance(value, list) else value


def image_folder_classes(root: str | None) -> int:
    """`${image_folder_classes:${dataset.root}}`: the number of class folders (0 when root is missing)."""
    from lab.data.image_folder import class_folders

    return len(class_folders(root))


def csv_table(path: str | None, target, features, key: str):
    """`${csv_table:${dataset.path},${dataset.target},${dataset.features},num_classes}`: what the config needs
    to know of a CSV table before it is read (`num_features`, `num_classes`; see `lab.data.tabular.describe`)."""
    from lab.data.tabular import describe

    return describe(path, target if isinstance(target, (str, type(None))) else list(target),
                    list(features) if features else None)[key]  # fmt: skip


def coalesce(*values):
    """`${coalesce:${oc.select:dataset.num_classes,null},1}`: the first value that is not null."""
    return next((v for v in values if v is not None), None)


def run_time(pattern: str) -> str:
    """Like Hydra's `${now:pattern}`, but `LAB_RUN_TIME` (ISO format) wins when set: torchrun ranks share it."""
    global _RUN_TIME
    if _RUN_TIME is None:
        env = os.environ.get("LAB_RUN_TIME")
        _RUN_TIME = datetime.fromisoformat(env) if env else datetime.now()
    return _RUN_TIME.strftime(pattern)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)
    for name, resolver in (
        ("weights_meta", weights_meta),
        ("image_folder_classes", image_folder_classes),
        ("csv_table", csv_table),
        ("coalesce", coalesce),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
    if not OmegaConf.has_resolver("run_time"):
        OmegaConf.register_new_resolver("run_time", run_time, use_cache=True)
