"""A sweep's report: `report.md` in the sweep folder, with its PNG figures in `figures/` beside it.

Written when a sweep ends (`lab.sweep.SweepSummary`) and rebuilt with the summary by
`python -m lab.sweep_summary <sweep dir>`. It shows
the monitored metric's curves of every job on one chart (per configuration a mean ± std band when jobs repeat a
configuration over seeds or folds), the final monitored value against each swept parameter, the table of
configurations (`lab.aggregate`) and, for an Optuna study, Optuna's own matplotlib plots (history, parameter
importances, parallel coordinates, slices): no server needed. Everything is read back from the job folders.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lab.aggregate import Group, aggregate, configuration_table, has_repeats, label, override_key, swept_keys
from lab.runs import Run, find_runs

FIGURES = "figures"


def monitor_of(runs: list[Run]) -> tuple[str, str]:
    """The monitored metric and its mode, as the jobs recorded them."""
    for run in runs:
        if run.metrics.get("monitor"):
            return str(run.metrics["monitor"]), str(run.metrics.get("mode") or "max")
    for run in runs:
        if run.config.get("checkpoint.monitor"):
            return str(run.config["checkpoint.monitor"]), str(run.config.get("checkpoint.mode") or "max")
    return "val/loss", "min"


def write_report(sweep_dir: Path) -> Path:
    """Write `report.md` and its figures into `sweep_dir`; returns the report's path."""
    runs = find_runs([sweep_dir])
    monitor, mode = monitor_of(runs)
    groups = aggregate(runs, "best", mode)
    keys = swept_keys(runs)
    figures = sweep_dir / FIGURES
    figures.mkdir(exist_ok=True)
    repeats = has_repeats(runs)
    ok = sum(len(g.succeeded) for g in groups)
    lines = [
        f"# Sweep report: {sweep_dir.name}",
        "",
        f"{len(runs)} jobs, {ok} succeeded; monitored metric `{monitor}` ({mode}). "
        "Per-job rows: [summary.md](summary.md).",
        "",
    ]
    lines += configuration_table(groups, keys, monitor, repeats)
    lines += ["## Curves", ""]
    if draw_curves(runs, groups, keys, monitor, repeats, figures / "curves.png"):
        what = "mean ± std per configuration" if repeats else "one line per job"
        lines += [
            f"`{monitor}` over training steps ({what}):",
            "",
            f"![{monitor} curves]({FIGURES}/curves.png)",
            "",
        ]
    else:
        lines += [f"No job logged `{monitor}` (use logger=tensorboard or logger=csv).", ""]
    params = [k for k in keys if k not in ("trainer.seed", "dataset.fold")]
    if params:
        lines += [f"## Best `{monitor}` against each swept parameter", ""]
        for key in params:
            name = f"param_{key.replace('/', '_')}.png"
            if draw_parameter(groups, key, monitor, figures / name):
                lines += [f"![{monitor} against {key}]({FIGURES}/{name})", ""]
    lines += optuna_section(sweep_dir, figures)
    path = sweep_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _figure() -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(7, 4.5), dpi=100, layout="constrained")


def save_figure(fig: Any, path: Path, what: str = "curves") -> None:
    """Save as PNG with what it shows in the PNG's Description (e.g. "2 curves" and one line per label)."""
    if what == "curves":
        lines = [line for ax in fig.axes for line in ax.lines]
        text = [f"{len(lines)} curves", *(line.get_label() for line in lines)]
    else:
        from matplotlib.collections import PathCollection  # scatter's points (error bars are LineCollections)

        points = [c for ax in fig.axes for c in ax.collections if isinstance(c, PathCollection)]
        text = [f"{sum(len(c.get_offsets()) for c in points)} points"]
    fig.savefig(path, metadata={"Description": "\n".join(text)})


def draw_curves(
    runs: list[Run], groups: list[Group], keys: list[str], monitor: str, repeats: bool, path: Path
) -> bool:
    """The monitored metric's curve of every job (or a mean ± std band per configuration); False if none."""
    import numpy as np

    fig = _figure()
    ax = fig.add_subplot()
    drawn = 0
    for group in groups:
        curves = [run.curves[monitor] for run in group.runs if run.curves.get(monitor)]
        if not curves:
            continue
        name = label(group, keys)
        if repeats and len(curves) > 1:
            steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
            values = np.array([[dict(c)[s] for s in steps] for c in curves])
            mean, std = values.mean(0), values.std(0, ddof=1)
            (line,) = ax.plot(steps, mean, label=f"{name} (n={len(curves)})")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2, color=line.get_color())
        else:
            for run, curve in zip(group.runs, curves, strict=False):
                ax.plot(
                    *zip(*curve, strict=True),
                    label=name if len(curves) == 1 else f"{name} {run.run_dir.name}",
                )
        drawn += 1
    if not drawn:
        return False
    ax.set_xlabel("step")
    ax.set_ylabel(monitor)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)
    return True


def draw_parameter(groups: list[Group], key: str, monitor: str, path: Path) -> bool:
    """The best value of each configuration against one swept parameter (error bars: std over repeats)."""
    points = []
    for group in groups:
        best = group.stats.get("best")
        value = next(
            (o.split("=", 1)[1] for o in group.overrides if override_key(o) == key and "=" in o), None
        )
        if best is not None and value is not None:
            points.append((value, best))
    if not points:
        return False
    fig = _figure()
    ax = fig.add_subplot()
    numbers = [_number(v) for v, _ in points]
    if all(n is not None for n in numbers):
        xs: list[Any] = numbers
        positive = [n for n in numbers if n > 0]
        if len(positive) == len(numbers) and max(positive) / min(positive) >= 100:
            ax.set_xscale("log")
    else:
        categories = sorted({v for v, _ in points})
        xs = [categories.index(v) for v, _ in points]
        ax.set_xticks(range(len(categories)), categories, rotation=20)
    ys = [s.mean for _, s in points]
    errors = [s.std or 0.0 for _, s in points]
    ax.errorbar(xs, ys, yerr=errors, fmt="none", capsize=3)
    ax.scatter(xs, ys, zorder=3)
    ax.set_xlabel(key)
    ax.set_ylabel(f"best {monitor}")
    ax.grid(alpha=0.3)
    save_figure(fig, path, "points")
    return True


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


OPTUNA_PLOTS = {
    "optuna_history.png": ("plot_optimization_history", "optimisation history"),
    "optuna_importances.png": ("plot_param_importances", "parameter importances"),
    "optuna_parallel_coordinate.png": ("plot_parallel_coordinate", "parallel coordinates"),
    "optuna_slice.png": ("plot_slice", "slices"),
}


def optuna_section(sweep_dir: Path, figures: Path) -> list[str]:
    """Optuna's matplotlib plots of the sweep's study; a plot that cannot be drawn is named with the reason."""
    study = load_study(sweep_dir)
    if study is None:
        return []
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as plots

    lines = [f"## Optuna study `{study.study_name}`", ""]
    single = len(study.directions) == 1
    for name, (function, title) in OPTUNA_PLOTS.items():
        kwargs = (
            {}
            if single
            else {
                "target": lambda t: t.values[0],
                "target_name": study.metric_names[0] if study.metric_names else "objective 0",
            }
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore"
                )  # ExperimentalWarning: the matplotlib backend is "experimental"
                axes = getattr(plots, function)(study, **kwargs)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            lines += [f"- {title}: not drawn ({e})", ""]
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.savefig(figures / name, bbox_inches="tight")
        plt.close(figure)
        lines += [f"![{title}]({FIGURES}/{name})", ""]
    return lines


def load_study(sweep_dir: Path) -> Any:
    """The Optuna study in the sweep dir (optuna.db or optuna.journal), or None.

    A storage holding several studies: the one named after the jobs' task_name (the sweeper's default name).
    """
    db, journal = sweep_dir / "optuna.db", sweep_dir / "optuna.journal"
    if not (db.is_file() or journal.is_file()):
        return None
    try:
        import optuna
        from optuna.storages.journal import JournalFileBackend
    except ImportError:
        return None
    if db.is_file():
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{db}", engine_kwargs={"connect_args": {"timeout": 60}}
        )
    else:
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    names = optuna.get_all_study_names(storage)
    if len(names) > 1:
        configs = sweep_dir.glob("*/.hydra/config.yaml")
        task = next((OmegaConf.load(p).get("task_name") for p in configs), None)
        names = [n for n in names if n == task]
    if len(names) != 1:
        return None
    return optuna.load_study(study_name=names[0], storage=storage)
