"""A finished (or interrupted) run read back from its folder: config, final metrics and logged curves.

What `lab.compare` and the sweep report draw from. Curves come from `metrics.csv` (CSV logger) when the run has
one, else from its TensorBoard event files, so any run with either logger can be compared.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lab.errors import UserError

Curve = list[tuple[int, float]]  # (global step, value), step ascending


@dataclass
class Run:
    run_dir: Path
    overrides: list[str]
    metrics: dict[str, Any]  # metrics.json ({} when the run never finished)
    _config: dict[str, Any] | None = field(default=None, repr=False)
    _curves: dict[str, Curve] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.run_dir)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config, flattened to dotted keys; read when first asked for (a sweep's summary, redone
        after each job, needs only the overrides and metrics of every job)."""
        if self._config is None:
            self._config = resolved(OmegaConf.load(self.run_dir / ".hydra" / "config.yaml"))
        return self._config

    @property
    def curves(self) -> dict[str, Curve]:
        if self._curves is None:
            self._curves = read_curves(self.run_dir)
        return self._curves


def is_run(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file()


def read_run(run_dir: Path) -> Run:
    hydra_dir = run_dir / ".hydra"
    overrides_file = hydra_dir / "overrides.yaml"
    overrides = [str(o) for o in (OmegaConf.load(overrides_file) or [])] if overrides_file.is_file() else []
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {}
    return Run(run_dir, overrides, metrics)


def resolved(config: Any) -> dict[str, Any]:
    """Dotted key → value, interpolations resolved where they can be outside the run (`${hydra:…}` cannot)."""
    flat = flatten(OmegaConf.to_container(config, resolve=False))
    for key, raw in flat.items():
        if isinstance(raw, str) and "${" in raw:
            value = OmegaConf.select(config, key, default=None, throw_on_resolution_failure=False)
            flat[key] = raw if value is None else value
    return flat


def find_runs(paths: list[Path]) -> list[Run]:
    """Each path a run folder, or a sweep folder standing for its job folders (in job order)."""
    runs = []
    for path in paths:
        if is_run(path):
            runs.append(read_run(path))
            continue
        jobs = sorted((p.parent.parent for p in path.glob("*/.hydra/config.yaml")), key=_job_order)
        if not jobs:
            raise UserError("neither a run folder (.hydra/config.yaml) nor a sweep folder (<job>/.hydra/)",
                            str(path), "give outputs/<task>/runs/<run> or outputs/<task>/multiruns/<sweep>")  # fmt: skip
        runs += [read_run(job) for job in jobs]
    return runs


def _job_order(path: Path) -> tuple[int, int, str]:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat |= flatten(value, f"{prefix}{key}.")
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def read_curves(run_dir: Path) -> dict[str, Curve]:
    """Every scalar a run logged, tag → [(step, value)], from metrics.csv or else the TensorBoard events."""
    table = run_dir / "metrics.csv"
    if table.is_file():
        return _csv_curves(table)
    events = run_dir / "tensorboard"
    if events.is_dir() and any(events.rglob("events.out.tfevents*")):
        return _tensorboard_curves(events)
    return {}


def _csv_curves(path: Path) -> dict[str, Curve]:
    curves: dict[str, Curve] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for tag, text in row.items():
                if tag == "step" or text in (None, ""):
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                curves.setdefault(tag, []).append((int(float(step)), value))
    return {tag: sorted(points) for tag, points in curves.items()}


def _tensorboard_curves(log_dir: Path) -> dict[str, Curve]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Every folder of event files below the run's tensorboard/ (each holds one writer's files, in order).
    curves: dict[str, dict[int, float]] = {}
    for folder in sorted({p.parent for p in log_dir.rglob("events.out.tfevents*")}):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
        for tag in events.Tags()["scalars"]:
            for event in events.Scalars(tag):
                curves.setdefault(tag, {})[event.step] = event.value  # a later write of a step wins
    return {tag: sorted(points.items()) for tag, points in curves.items()}


def final_metrics(run: Run) -> dict[str, float]:
    """The numbers a run reports at its end: `val/…`, `test/…`, `best` (finite numbers only)."""
    return {
        key: float(value)
        for key, value in run.metrics.items()
        if (key == "best" or key.startswith(("val", "test"))) and _finite(value)
    }


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def ran_other_code(run: Run, code_dir: Path) -> bool:
    """Whether a sweep's job ran other code than the sweep started from (`<sweep dir>/code/`): another commit or
    other uncommitted changes to tracked files, by the job's `run_info.json`."""
    from lab.runtime import sha256

    try:
        info = json.loads((run.run_dir / "run_info.json").read_text())
        commit = (code_dir / "commit.txt").read_text().strip()
        diff = (code_dir / "diff.patch").read_text().strip()
    except (OSError, ValueError):
        return False
    if info.get("git_commit") is None or info.get("git_diff_sha256") is None:
        return False
    return info["git_commit"] != commit or info["git_diff_sha256"] != sha256(diff)
