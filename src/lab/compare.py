"""`python -m lab.compare <run or sweep folder> ...`: any runs side by side, whichever sweep they came from.

Prints the config keys whose values differ between the runs and their final metrics (metrics.json) in columns,
and writes their curves overlaid (the monitored metric and `train/loss`) as one PNG, saying where. A sweep folder
stands for all of its jobs. Curves come from each run's metrics.csv or TensorBoard event files (`lab.runs`).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from lab.errors import EXIT_USER_ERROR, UserError
from lab.report import save_figure
from lab.runs import Run, final_metrics, find_runs

# Keys that differ between any two runs without saying anything about them.
IGNORED = ("paths.", "hydra.", "ckpt_path", "resume")


def differing_keys(runs: list[Run]) -> list[str]:
    keys = sorted({key for run in runs for key in run.config})
    return [
        key
        for key in keys
        if not key.startswith(IGNORED) and len({repr(run.config.get(key, "—")) for run in runs}) > 1
    ]


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def names(runs: list[Run]) -> list[str]:
    """Short column names: `<sweep>/<job>` for jobs, the folder name for runs."""
    return [
        f"{run.run_dir.parent.name}/{run.run_dir.name}" if run.run_dir.name.isdigit() else run.run_dir.name
        for run in runs
    ]


def text_report(runs: list[Run]) -> str:
    columns = names(runs)
    keys = differing_keys(runs)
    config_rows = [[key, *(str(run.config.get(key, "—")) for run in runs)] for key in keys]
    metrics = sorted(
        {m for run in runs for m in final_metrics(run)}, key=lambda m: (m != "best", m[:3] != "val", m)
    )
    metric_rows = [[m, *(_cell(final_metrics(run).get(m)) for run in runs)] for m in metrics]
    metric_rows.append(["status", *(_cell(run.metrics.get("status", "unfinished")) for run in runs)])
    parts = [
        f"{len(runs)} runs:",
        *(f"  {n}: {run.run_dir}" for n, run in zip(columns, runs, strict=True)),
        "",
    ]
    parts += ["config keys that differ:", table(["key", *columns], config_rows) if keys else "  (none)", ""]
    parts += ["final metrics:", table(["metric", *columns], metric_rows)]
    return "\n".join(parts)


def monitored(runs: list[Run]) -> str:
    return next((str(r.metrics["monitor"]) for r in runs if r.metrics.get("monitor")), None) or str(
        runs[0].config.get("checkpoint.monitor", "val/loss")
    )


def draw(runs: list[Run], tags: list[str], path: Path) -> list[str]:
    """One panel per tag, one line per run; returns the tags that some run logged."""
    from matplotlib.figure import Figure

    tags = [tag for tag in tags if any(run.curves.get(tag) for run in runs)]
    if not tags:
        return []
    fig = Figure(figsize=(6 * len(tags), 4.5), dpi=100, layout="constrained")
    for ax, tag in zip(fig.subplots(1, len(tags), squeeze=False)[0], tags, strict=True):
        for name, run in zip(names(runs), runs, strict=True):
            if curve := run.curves.get(tag):
                ax.plot(*zip(*curve, strict=True), label=name)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return tags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.compare", description=__doc__)
    parser.add_argument("folders", nargs="+", type=Path, help="run folders and/or sweep folders")
    parser.add_argument(
        "--metric", action="append", help="curve(s) to draw (default: the monitor and train/loss)"
    )
    parser.add_argument("--out", type=Path, help="the PNG to write (default: outputs/compare/<time>.png)")
    args = parser.parse_args(argv)
    try:
        for folder in args.folders:
            if not folder.is_dir():
                raise UserError(
                    "no such folder", str(folder), "give run folders (outputs/<task>/runs/<run>) or sweeps"
                )
        runs = find_runs(args.folders)
        out = args.out or Path("outputs", "compare", f"{datetime.now():%Y-%m-%d_%H-%M-%S}.png")
        if out.exists():
            raise UserError("exists already (nothing is overwritten)", str(out), "give another --out")
    except UserError as e:
        print(e.line(), file=sys.stderr)
        return EXIT_USER_ERROR
    print(text_report(runs))
    drawn = draw(runs, args.metric or [monitored(runs), "train/loss"], out)
    print(
        f"\ncurves ({', '.join(drawn)}): {out}"
        if drawn
        else "\nno curves: the runs logged none (logger=none)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
