"""Results over repeats: the jobs of a sweep that differ only by seed (`trainer.seed`) or fold (`dataset.fold`)
form one configuration, reported as mean, standard deviation, count and a 95 % confidence interval per metric.

The interval is Student's t: mean ± t(0.975, n−1) · std / √n, with the sample standard deviation (n−1); it needs
at least two successful repeats. Failed, pruned or unfinished jobs are left out of the statistics and counted apart.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from lab.runs import Run, final_metrics

REPEAT_KEYS = ("trainer.seed", "dataset.fold")  # what varies between repeats of one configuration


@dataclass
class Stat:
    mean: float
    std: float | None  # None for a single value
    n: int
    ci95: float | None  # half-width of the 95 % confidence interval; None below two values

    def text(self) -> str:
        if self.std is None:
            return f"{self.mean:.4f}"
        return f"{self.mean:.4f} ± {self.std:.4f}"


@dataclass
class Group:
    overrides: list[str]  # the configuration: the jobs' overrides without seed, fold and the sweep preset
    runs: list[Run] = field(default_factory=list)  # every job of the configuration
    stats: dict[str, Stat] = field(default_factory=dict)  # over its successful jobs

    @property
    def succeeded(self) -> list[Run]:
        return [r for r in self.runs if r.metrics.get("status") == "success"]


def stat(values: list[float]) -> Stat:
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Stat(mean, None, n, None)
    from scipy.stats import t

    std = statistics.stdev(values)
    return Stat(mean, std, n, float(t.ppf(0.975, n - 1)) * std / math.sqrt(n))


def override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def configuration(overrides: list[str]) -> tuple[str, ...]:
    return tuple(o for o in overrides if override_key(o) not in (*REPEAT_KEYS, "sweep"))


def has_repeats(runs: list[Run]) -> bool:
    return any(override_key(o) in REPEAT_KEYS for run in runs for o in run.overrides)


def aggregate(runs: list[Run], monitor: str = "best", mode: str = "max") -> list[Group]:
    """One group per configuration, best mean of `monitor` first; groups without a success last."""
    groups: dict[tuple[str, ...], Group] = {}
    for run in runs:
        key = configuration(run.overrides)
        groups.setdefault(key, Group(list(key))).runs.append(run)
    for group in groups.values():
        values: dict[str, list[float]] = {}
        for run in group.succeeded:
            for name, value in final_metrics(run).items():
                values.setdefault(name, []).append(value)
        group.stats = {name: stat(v) for name, v in values.items()}
    sign = -1.0 if mode == "max" else 1.0
    ranked = sorted(
        groups.values(), key=lambda g: (0, sign * g.stats[monitor].mean) if monitor in g.stats else (1, 0.0)
    )
    return ranked


def swept_keys(runs: list[Run]) -> list[str]:
    """The keys whose override differs between jobs, in the order they first appear (seed and fold included)."""
    keys: list[str] = []
    for run in runs:
        for override in run.overrides:
            key = override_key(override)
            if key not in keys and key != "sweep" and len({_value(r, key) for r in runs}) > 1:
                keys.append(key)
    return keys


def _value(run: Run, key: str) -> str | None:
    return next((o.split("=", 1)[1] for o in run.overrides if override_key(o) == key and "=" in o), None)


def label(group: Group, keys: list[str]) -> str:
    own = [o for o in group.overrides if override_key(o) in keys]
    return " ".join(own) or "(defaults)"


def configuration_table(groups: list[Group], keys: list[str], monitor: str, repeats: bool) -> list[str]:
    metrics = sorted(
        {name for g in groups for name in g.stats if name != "best"}, key=lambda m: (m[:3] != "val", m)
    )
    if repeats:
        title = "## Configurations (mean ± std over repeats; 95 % CI half-width of the best value)"
        header = ["rank", "configuration", "n", f"best {monitor}", "95 % CI", *metrics]
    else:
        title = "## Jobs"
        header = ["rank", "configuration", f"best {monitor}", *metrics]
    rows = []
    for rank, group in enumerate(groups, 1):
        best = group.stats.get("best")
        cells = [str(rank), label(group, keys).replace("|", "\\|")]
        if repeats:
            failed = len(group.runs) - len(group.succeeded)
            cells.append(f"{len(group.succeeded)}" + (f" (+{failed} not successful)" if failed else ""))
        cells.append(best.text() if best else "")
        if repeats:
            cells.append(f"± {best.ci95:.4f}" if best and best.ci95 is not None else "")
        cells += [group.stats[m].text() if m in group.stats else "" for m in metrics]
        rows.append("| " + " | ".join(cells) + " |")
    return [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows, ""]


def configurations_csv(groups: list[Group], keys: list[str]) -> str:
    """One row per configuration: its overrides, then mean, std, n and the 95 % CI half-width of each metric."""
    import csv
    import io

    metrics = sorted(
        {name for g in groups for name in g.stats}, key=lambda m: (m != "best", m[:3] != "val", m)
    )
    header = [
        "rank",
        "configuration",
        "jobs",
        *(f"{m}_{s}" for m in metrics for s in ("mean", "std", "n", "ci95")),
    ]
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(header)
    for rank, group in enumerate(groups, 1):
        row: list[object] = [rank, label(group, keys), len(group.runs)]
        for name in metrics:
            s = group.stats.get(name)
            row += [s.mean, s.std, s.n, s.ci95] if s else [None] * 4
        writer.writerow(["" if v is None else v for v in row])
    return table.getvalue()
