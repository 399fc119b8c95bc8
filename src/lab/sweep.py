"""Sweep summary: one row per job of a multirun, best first, in `summary.csv` and `summary.md` of the sweep dir.

`SweepSummary` is a Hydra callback (`hydra.callbacks` in conf/hydra/default.yaml): it updates the summary after
each job (so a long or interrupted sweep has one so far) and writes and prints it when the multirun ends;
`python -m lab.sweep_summary <sweep dir>` rebuilds it, e.g. for a sweep stopped with Ctrl-C. Everything is read
back from the job dirs (`metrics.json`, `.hydra/`), so the summary is the same however the jobs were launched.

Resuming: `sweep.json` in the sweep dir records what the sweep is (its overrides and search space); a sweep dir
only ever holds the jobs of that one sweep. Running the same sweep again in it skips the jobs whose metrics.json
says success (or pruned), resumes interrupted jobs from their own `checkpoints/last.pt` (`lab.train.resolve_resume`)
and runs failed ones again (`finished_job`); a different sweep there is refused before any job starts.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lab.aggregate import aggregate, configuration_table, configurations_csv, has_repeats, label, swept_keys
from lab.report import load_study, write_report
from lab.runs import find_runs, ran_other_code

SUCCESS = "success"
DONE = (SUCCESS, "pruned")  # a job in this state is not run again when its sweep is re-run
RECORD = "sweep.json"
INCOMPLETE = "incomplete"  # no metrics.json: crashed, killed or still running


@dataclass
class Job:
    num: int | str
    run_dir: Path
    overrides: list[str]
    status: str
    monitor: str | None
    mode: str | None
    best: float | None  # best value of the monitor
    test: float | None  # the monitor's test counterpart (val/acc → test/acc)
    epochs: int | None
    wall_time_s: float | None
    checkpoint: Path | None
    pruned_epoch: int | None = None  # the epoch after which Optuna pruned the trial
    trial_state: str | None = (
        None  # COMPLETE, PRUNED, FAIL, RUNNING: the job's trial in the sweep's Optuna study
    )
    objective: float | None = (
        None  # the value of its COMPLETE trial in a single-objective study: what ranks it
    )

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS and self.best is not None and math.isfinite(self.best)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_job(run_dir: Path) -> Job:
    """One job from what it left on disk; a missing or unreadable metrics.json means the job never finished."""
    hydra_dir = run_dir / ".hydra"
    overrides = list(OmegaConf.load(hydra_dir / "overrides.yaml") or [])
    config_file = hydra_dir / "config.yaml"
    started = config_file.stat().st_mtime if config_file.is_file() else None
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {}
    monitor, mode = metrics.get("monitor"), metrics.get("mode")
    if not (monitor and mode):  # a job that never finished: what its config says (read only then)
        config = OmegaConf.load(config_file) if started is not None else None
        monitor = monitor or _select(config, "checkpoint.monitor")
        mode = mode or _select(config, "checkpoint.mode")
    test_key = f"test/{monitor.split('/', 1)[-1]}" if monitor else None
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    wall = max(p.stat().st_mtime for p in files) - started if started is not None and files else None
    checkpoints = (run_dir / "checkpoints" / name for name in ("best.pt", "last.pt"))
    checkpoint = next((p for p in checkpoints if p.is_file()), None)
    return Job(
        num=int(run_dir.name) if run_dir.name.isdigit() else run_dir.name,
        run_dir=run_dir,
        overrides=[str(o) for o in overrides],
        status=str(metrics.get("status", INCOMPLETE)),
        monitor=monitor,
        mode=mode,
        best=_number(metrics.get("best")),
        test=_number(metrics.get(test_key)) if test_key else None,
        epochs=metrics.get("epochs"),
        wall_time_s=round(wall, 1) if wall is not None else None,
        checkpoint=checkpoint,
        pruned_epoch=metrics.get("pruned_epoch"),
    )


def _select(config: DictConfig | None, key: str) -> str | None:
    if config is None:
        return None
    value = OmegaConf.select(config, key, default=None, throw_on_resolution_failure=False)
    return str(value) if value is not None else None


def collect(sweep_dir: Path) -> list[Job]:
    """Every job dir (a sub-folder with `.hydra/overrides.yaml`), best first; failed and unfinished ones last.

    With a single-objective Optuna study in the sweep dir, "best" is the study's: its objective and direction
    rank the jobs, so the summary names the trial that the study and optimization_results.yaml name.
    """
    runs = sorted(p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml"))
    jobs = [read_job(run) for run in runs]
    study = load_study(sweep_dir)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)} if study is not None else {}
    ranked_by_study = study is not None and len(study.directions) == 1
    for job in jobs:
        trial = trials.get(job.num)
        job.trial_state = trial.state.name if trial is not None else None
        if ranked_by_study and job.trial_state == "COMPLETE":
            job.objective = trial.value
    by_num = sorted(
        jobs, key=lambda j: (isinstance(j.num, str), j.num if isinstance(j.num, int) else 0, j.num)
    )
    # sorted() is stable: equal values and the failed jobs keep the job order.
    if ranked_by_study:
        sign = -1.0 if study.direction.name == "MAXIMIZE" else 1.0
        return sorted(
            by_num, key=lambda j: (0, sign * j.objective) if j.ok and j.objective is not None else (1, 0.0)
        )
    sign = -1.0 if sweep_mode(jobs) == "max" else 1.0
    return sorted(by_num, key=lambda j: (0, sign * j.best) if j.ok else (1, 0.0))


def command_line(job: Job) -> str:
    """`python train.py <the job's overrides>`: the job again as a single run (without the sweep preset)."""
    return shlex.join(["python", "train.py", *(o for o in job.overrides if not o.startswith("sweep="))])


def sweep_mode(jobs: list[Job]) -> str:
    return next((j.mode for j in jobs if j.mode), "max")


def swept(jobs: list[Job]) -> tuple[list[str], list[list[str]]]:
    """The overrides all jobs share, and each job's own (what the sweep varied)."""
    if len(jobs) < 2:
        return [], [j.overrides for j in jobs]
    common = [o for o in jobs[0].overrides if all(o in j.overrides for j in jobs[1:])]
    return common, [[o for o in j.overrides if o not in common] for j in jobs]


def write_summary(sweep_dir: Path) -> list[Job]:
    """Write summary.csv and summary.md into `sweep_dir`; returns the jobs best first."""
    jobs = collect(sweep_dir)
    monitor = next((j.monitor for j in jobs if j.monitor), "val/acc")
    test_key = f"test/{monitor.split('/', 1)[-1]}"
    common, own = swept(jobs)
    header = ["job", "status", "overrides", monitor, test_key, "epochs", "wall_time_s", "run_dir"]
    rows = [
        [j.num, j.status, " ".join(o), j.best, j.test, j.epochs, j.wall_time_s, j.run_dir]
        for j, o in zip(jobs, own, strict=True)
    ]
    if any(j.trial_state for j in jobs):  # an Optuna sweep: the trial's state and where it was pruned
        header[2:2] = ["trial_state", "pruned_epoch"]
        for row, job in zip(rows, jobs, strict=True):
            row[2:2] = [job.trial_state, job.pruned_epoch]

    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    write_atomic(sweep_dir / "summary.csv", table.getvalue())

    def cell(value: Any, column: str) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.1f}" if column == "wall_time_s" else f"{value:.4f}"
        return str(value).replace("|", "\\|")

    lines = [
        f"# Sweep {sweep_dir.name}",
        "",
        f"{counts(jobs)}; sorted by {ranking(jobs, monitor)}, best first.",
        "",
        *([f"Overrides common to all jobs: `{' '.join(common)}`", ""] if common else []),
        *([f"Best job again as a single run: `{command_line(best)}`", ""] if (best := _best(jobs)) else []),
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(cell(v, c) for v, c in zip(row, header, strict=True)) + " |" for row in rows),
    ]
    runs = find_runs([sweep_dir]) if jobs else []
    if changed := other_code(sweep_dir, runs):
        lines += ["", f"**Code changed while the sweep ran**: job(s) {', '.join(changed)} ran other code than the "
                  "sweep started from (`code/`; each job's `run_info.json`)."]  # fmt: skip
    if has_repeats(runs):  # seeds or folds: one row per configuration too
        groups = aggregate(runs, "best", sweep_mode(jobs))
        lines += ["", *configuration_table(groups, swept_keys(runs), monitor, repeats=True)]
        write_atomic(sweep_dir / "summary_configs.csv", configurations_csv(groups, swept_keys(runs)))
    write_atomic(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    return jobs


def other_code(sweep_dir: Path, runs: list) -> list[str]:
    """The jobs that ran other code than the sweep's `code/` record (none when it has no record)."""
    code = sweep_dir / "code"
    return [run.run_dir.name for run in runs if code.is_dir() and ran_other_code(run, code)]


def ranking(jobs: list[Job], monitor: str) -> str:
    if any(j.objective is not None for j in jobs):
        return "the Optuna study's objective (the value each COMPLETE trial was told)"
    return f"`{monitor}` ({sweep_mode(jobs)})"


def write_atomic(path: Path, text: str) -> None:
    """Parallel jobs (joblib, SLURM) each rewrite the summary when they end: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def counts(jobs: list[Job]) -> str:
    statuses: dict[str, int] = {}
    for job in jobs:
        statuses[job.status] = statuses.get(job.status, 0) + 1
    order = sorted(statuses, key=lambda status: (status != SUCCESS, status))
    noun = "job" if len(jobs) == 1 else "jobs"
    return f"{len(jobs)} {noun}: " + ", ".join(f"{statuses[status]} {status}" for status in order)


def _best(jobs: list[Job]) -> Job | None:
    if any(j.objective is not None for j in jobs):  # the study's best trial
        return next((j for j in jobs if j.ok and j.objective is not None), None)
    return next((j for j in jobs if j.ok), None)


def report(sweep_dir: Path, jobs: list[Job]) -> str:
    """What the console shows: where the summary is, and how to get the best job back."""
    lines = [f"sweep summary ({counts(jobs)}): {sweep_dir / 'summary.md'}"]
    best = _best(jobs)
    runs = find_runs([sweep_dir]) if jobs else []
    if has_repeats(runs):  # the best configuration by its mean, and its best job
        groups = aggregate(runs, "best", sweep_mode(jobs))
        top = groups[0].stats.get("best") if groups else None
        if top is not None:
            ci = f", 95 % CI ± {top.ci95:.4f}" if top.ci95 is not None else ""
            lines.append(f"best configuration: {label(groups[0], swept_keys(runs))}  "
                         f"{jobs[0].monitor} {top.text()} (n={top.n}{ci})")  # fmt: skip
            own = {run.run_dir for run in groups[0].runs}
            best = _best([job for job in jobs if job.run_dir in own])
    if best is None:
        lines.append("no job succeeded")
    else:
        test = f"  test={best.test:.4f}" if best.test is not None else ""
        objective = f"  objective={best.objective:.4f}" if best.objective is not None else ""
        lines += [
            f"best: job {best.num}{objective}  {best.monitor}={best.best:.4f}{test}",
            f"  overrides: {' '.join(best.overrides)}",
            f"  checkpoint: {best.checkpoint or '(none saved)'}",
            f"  run it again: {command_line(best)}",
        ]
    return "\n".join(lines)


def sweep_record(config: DictConfig) -> dict[str, Any]:
    """What makes a sweep the same sweep: its command-line overrides and its sweeper's search space."""
    from lab.redact import redact, redact_override

    sweeper = config.hydra.sweeper
    return {
        "overrides": [redact_override(str(o)) for o in config.hydra.overrides.task],
        "sweeper": str(sweeper.get("_target_")),
        "params": redact(
            OmegaConf.to_container(sweeper.params, resolve=False) if sweeper.get("params") else {}
        ),
    }


def check_search_space(config: DictConfig) -> None:
    """Before the first job: every swept key exists in the composed config (or is added with `+key=`) and each of
    its values fits the key's type in the schema (one line, exit 2, else). Keys under a swept config group
    (`model=mlp,simple_cnn model.width=...`) are left to each job: the master config holds one option only."""
    import copy

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from omegaconf.errors import OmegaConfBaseException

    from lab.errors import UserError

    params = config.hydra.sweeper.get("params") or {}
    from_params = [f"{key}={value}" for key, value in params.items()]
    overrides = OverridesParser.create().parse_overrides([*from_params, *config.hydra.overrides.task])
    groups = set(config.hydra.runtime.choices)
    swept_groups = {o.key_or_group for o in overrides if o.is_sweep_override() and o.key_or_group in groups}
    task = copy.deepcopy(config)
    for override in overrides:
        key = override.key_or_group
        if not override.is_sweep_override() or key in groups or override.type != OverrideType.CHANGE:
            continue  # a group option (Hydra checks it), `+key` (added), `~key`
        if any(key.startswith(f"{group}.") for group in swept_groups):
            continue
        where = f"hydra.sweeper.params.{key}" if key in params else key
        if OmegaConf.select(task, key, default=_MISSING, throw_on_resolution_failure=False) is _MISSING:
            UserError(
                f"the search space sweeps {key}, which this config does not have "
                f"(model={config.hydra.runtime.choices.get('model')})",
                where,
                f"check the name (`python train.py --cfg job` prints the config), add it with +{key}=..., or drop "
                "the preset's search space ('~hydra.sweeper.params') and give yours on the command line"
                if where != key
                else f"check the name (`python train.py --cfg job` prints the config) or add it with +{key}=...",
            ).exit()  # fmt: skip
        if override.is_interval_sweep():
            continue  # numbers by construction: the typed bounds are checked when a job composes its config
        for value in override.sweep_iterator():
            try:
                OmegaConf.update(task, key, value)
            except OmegaConfBaseException as e:
                UserError(f"the search space gives {key} the value {value!r}: {str(e).splitlines()[0]}", where,
                          "give values of the key's type").exit()  # fmt: skip


_MISSING = object()


def claim_sweep_dir(config: DictConfig) -> None:
    """Write `sweep.json`, or check that the sweep dir holds this very sweep (else one line, exit 2)."""
    from lab.errors import UserError

    sweep_dir = Path(config.hydra.sweep.dir)
    record, path = sweep_record(config), sweep_dir / RECORD
    earlier = json.loads(path.read_text()) if path.is_file() else None
    if earlier is None and any(sweep_dir.glob("*/.hydra/overrides.yaml")):
        earlier = {"overrides": ["(a sweep that left no sweep.json)"]}
    if earlier is not None and earlier != record:
        UserError(
            f"the sweep dir holds the jobs of another sweep ({' '.join(earlier['overrides'])})",
            "hydra.sweep.dir",
            "give this sweep a new hydra.sweep.dir, or re-run that sweep's own command to resume it",
        ).exit()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=2) + "\n")


def finished_job(output_dir: Path, num: Any) -> float | None:
    """A job of a re-run sweep: its objective when it finished in an earlier run (not run again), else None.

    A failed earlier attempt is moved to `failed-attempt-<n>/` in the job dir, so this attempt starts clean and
    nothing it reports comes from the earlier one (its checkpoints are never resumed from).
    """
    import logging

    try:
        metrics = json.loads((output_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None  # never finished: resumed from its own last.pt if it wrote one
    log = logging.getLogger("lab")
    if metrics.get("status") in DONE:
        log.info("sweep job %s: %s in an earlier run of this sweep (%s), not run again", num,
                 metrics["status"], output_dir / "metrics.json")  # fmt: skip
        best = _number(metrics.get("best"))
        return best if best is not None else math.nan
    attempt = next(output_dir / f"failed-attempt-{n}" for n in range(1, 10_000)
                   if not (output_dir / f"failed-attempt-{n}").exists())  # fmt: skip
    attempt.mkdir()
    for path in output_dir.iterdir():  # train.log is open (Hydra appends to it) and .hydra/ is this attempt's
        if (
            path != attempt
            and not path.name.startswith((".", "failed-attempt-"))
            and path.name != "train.log"
        ):
            path.rename(attempt / path.name)
    log.info("sweep job %s: %s in an earlier run of this sweep, run again (that attempt: %s)", num,
             metrics.get("status"), attempt)  # fmt: skip
    return None


class SweepSummary(Callback):
    """Claims the sweep dir (`sweep.json`); updates the summary after each job; at the end prints the best job and
    exits 1 when no job succeeded."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_search_space(config)
        claim_sweep_dir(config)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or os.environ.get("RANK", "0") != "0":
            return  # a single run, or a rank > 0 of a torchrun job
        try:
            write_summary(Path(config.hydra.sweep.dir))
        except Exception as e:  # a summary so far is a convenience: never fail the job over it
            print(f"warning: sweep summary not updated ({type(e).__name__}: {e})", file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            jobs = write_summary(sweep_dir)
        except Exception as e:  # the jobs are done and saved: a summary problem must not hide that
            print(f"warning: no sweep summary ({type(e).__name__}: {e}); "
                  f"rebuild it with `python -m lab.sweep_summary {sweep_dir}`", file=sys.stderr)  # fmt: skip
            return
        print(report(sweep_dir, jobs), flush=True)
        try:
            print(f"sweep report: {write_report(sweep_dir)}", flush=True)
        except Exception as e:  # figures are a convenience: never hide the finished jobs behind them
            print(f"warning: no sweep report ({type(e).__name__}: {e}); "
                  f"rebuild it with `python -m lab.sweep_summary {sweep_dir}`", file=sys.stderr)  # fmt: skip
        if jobs and not any(j.ok for j in jobs):
            print(f"error: every job of the sweep failed ({sweep_dir}): see their train.log", file=sys.stderr)
            sys.exit(1)
