"""Which options go together: the model and task a dataset brings, and choices that cannot work together.

A dataset config names the model and task it trains with in `prefers`, e.g. `prefers: {model: mlp, task:
regression}` in `conf/dataset/diabetes.yaml`: `python train.py dataset=diabetes` then runs as if `model=mlp
task=regression` were on the command line, unless the command line (or an `experiment`) chooses them itself.
Hydra's own `override /model: mlp` cannot say this from a dataset config: a config group may only override groups
listed before it, and backbone model configs must come after the dataset (they set its image size and statistics).

`check_choices` refuses, before anything is built, a model or task that cannot work with the dataset: one line
naming both keys.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lab.errors import UserError

PREFERRED_GROUPS = ("model", "task")


def _prefers(conf_dir: Path, option: str) -> dict:
    """`prefers` of conf/dataset/<option>.yaml, following the dataset configs it extends (`defaults: [wine]`)."""
    path = conf_dir / "dataset" / f"{option}.yaml"
    if not path.is_file():
        return {}
    node = OmegaConf.load(path)
    inherited: dict = {}
    for entry in node.get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_" and "/" not in entry:
            inherited |= _prefers(conf_dir, entry)
    return inherited | dict(node.get("prefers") or {})


def preferred_overrides(overrides: list[str], conf_dir: Path) -> list[str]:
    """`model=...`/`task=...` overrides the chosen dataset prefers and `overrides` leave open (none in a sweep
    over datasets, or with an experiment, which chooses its own)."""
    chosen = {
        arg.split("=", 1)[0].lstrip("+~").split("@")[0]: arg.split("=", 1)[1]
        for arg in overrides
        if "=" in arg
    }
    option = chosen.get("dataset")
    if option is None or "," in option or "experiment" in chosen:
        return []
    prefers = _prefers(conf_dir, option)
    return [
        f"{group}={prefers[group]}" for group in PREFERRED_GROUPS if group in prefers and group not in chosen
    ]


def _choice(cfg: DictConfig, group: str) -> str:
    """`group=<option>` as chosen (Hydra's runtime choices), else what the group's node builds."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        option = HydraConfig.get().runtime.choices.get(group)
        if option:
            return f"{group}={option}"
    target = OmegaConf.select(cfg, f"{group}._target_") or OmegaConf.select(cfg, f"{group}.name")
    return f"{group} ({target})" if target else group


def check_choices(cfg: DictConfig) -> None:
    """A model or task needing what the dataset lacks (images, classes, real values): one line, naming both."""
    from omegaconf import ListConfig
    from omegaconf.errors import InterpolationKeyError

    dataset = cfg.dataset
    name = dataset.get("name", "the dataset")
    table = "num_features" in dataset

    def where(group: str) -> str:
        return f"{_choice(cfg, group)}, {_choice(cfg, 'dataset')}"

    task, classes = _task_kind(cfg), OmegaConf.select(dataset, "num_classes", default=None)
    if task == "regression" and classes is not None:
        raise UserError(f"a regression task needs real-valued targets; {name} holds {classes} classes", where("task"),
                        "use task=classification, or a dataset with a numeric target (a CSV column of integers is "
                        "read as numbers with dataset.num_classes=null)")  # fmt: skip
    if task == "classification" and classes is None:
        raise UserError(f"a classification task needs classes; {name}'s targets are real values", where("task"),
                        "use task=regression")  # fmt: skip
    if task == "classification" and isinstance(dataset.get("target"), ListConfig):
        raise UserError(f"a list of target columns ({list(dataset.target)}) is a multi-label target", where("task"),
                        "use task=multilabel, or one target column for classification")  # fmt: skip
    kind = "a table" if table else "images"
    for group in PREFERRED_GROUPS:
        try:
            OmegaConf.to_container(cfg[group], resolve=True)
        except InterpolationKeyError as e:
            missing = str(e).split("'")[1] if "'" in str(e) else ""
            if not missing.startswith("dataset."):
                raise  # a key missing elsewhere: Hydra's own message says which
            fix = f"choose a {group} for {kind}" + (" (model=mlp)" if table and group == "model" else "")
            raise UserError(
                f"{group} needs {missing}, which {name} ({kind}) does not have", where(group), fix
            ) from None
    if table and ("image_size" in dataset or "channels" in dataset):
        raise UserError(f"the model takes images; {name} is a table of {dataset.num_features} features", where("model"),
                        "use model=mlp (or a model of your own for tables)")  # fmt: skip


def _task_kind(cfg: DictConfig) -> str | None:
    """ "classification" or "regression" for lab's tasks and their subclasses; None for any other task."""
    from hydra.utils import get_class

    from lab.tasks.classification import Classification
    from lab.tasks.regression import Regression

    target = OmegaConf.select(cfg, "task._target_")
    try:
        task = get_class(target) if target else None
    except Exception:
        return (
            None  # a task of the user's that does not import: reported where it is built, with its traceback
        )
    if isinstance(task, type) and issubclass(task, Regression):
        return "regression"
    if isinstance(task, type) and issubclass(task, Classification):
        return "classification"
    return None
