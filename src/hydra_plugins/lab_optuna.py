"""lab's Optuna sweeper: Hydra's sweeper interface on Optuna's ask/tell API. Selected by `conf/sweep/optuna.yaml`.

Hydra only instantiates sweepers that live in the `hydra_plugins` namespace package, hence this module's place.
Config: `conf/hydra/sweeper/lab_optuna.yaml` and its `sampler/`, `pruner/`, `storage/` groups. Behaviour:
- the search space is Hydra's override syntax (`choice`, `range`, `interval`, `tag(log, interval(...))`) from
  `params` and the command line; a plain value on the command line fixes a parameter;
- job N is Optuna trial N: each job finds its trial through its own Hydra config (`hydra.job.num` and
  `hydra.sweeper`), reports to it after every validation and stops when the pruner says so (lab.optuna_trial);
- `n_trials` counts the finished trials of the whole study, so re-running in the same sweep dir resumes it: a trial
  left RUNNING by an interrupted sweep runs again as the same job, which continues from its own last.pt; a FAIL
  trial of an earlier run is run again as a new trial with its parameters (user attribute `retry_of`), which counts
  in its place; the sampler is reseeded (its seed would repeat old trials);
- a job that failed, diverged (it returns NaN) or crashed is a FAIL trial; only crashes count against
  `max_failure_rate`; a job whose metrics.json says `pruned` is a PRUNED trial;
- `objectives` (metrics.json keys) makes a (multi-objective) study; by default the objective is what the job
  returns: the best value of `checkpoint.monitor`. `direction` follows the metric when not given (`directions`):
  `checkpoint.mode` for the monitor, minimise for losses and errors, maximise for accuracies and scores; a
  direction against its metric, or one that cannot be known, is a one-line error.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)


def distribution(override: Override) -> Any:
    """The Optuna distribution of a sweep override (`choice`, `range`, `interval`, `tag(log, interval)`)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():  # Python's range: the stop value is excluded
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(values[0], values[-1], step=value.step)
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"{override.input_line}: Optuna needs choice(), range() or interval()")


def search_space(arguments: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """`params` + command line → (distributions, fixed values); a later override of a key replaces an earlier one."""
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = override.get_value_element_as_str()
    return space, fixed


def grid(space: dict[str, Any]) -> dict[str, list[Any]]:
    """GridSampler's search space: every distribution must be discrete."""
    from optuna.distributions import CategoricalDistribution

    choices = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            choices[name] = list(dist.choices)
        elif getattr(dist, "step", None) is not None:
            count = round((dist.high - dist.low) / dist.step) + 1
            choices[name] = [dist.low + i * dist.step for i in range(count)]
        else:
            from lab.errors import UserError

            raise UserError(f"the grid sampler cannot sweep the interval of {name}", "hydra.sweeper.params",
                            "use choice(...) or range(...) for it, or another sampler")  # fmt: skip
    return choices


# How a metric's name (the part after `val/`) says which way is better.
MINIMIZED = ("loss", "error", "err", "mae", "mse", "rmse", "nll", "perplexity", "time")
MAXIMIZED = ("acc", "f1", "auc", "auroc", "precision", "recall", "r2", "iou", "dice", "map", "ap", "score")


def metric_direction(name: str) -> str | None:
    """`minimize` for losses and errors, `maximize` for accuracies and scores, None when the name does not say."""
    words = name.rsplit("/", 1)[-1].lower().replace("-", "_").split("_")
    if any(word in MINIMIZED for word in words):
        return "minimize"
    if any(word in MAXIMIZED or word.startswith("acc") for word in words):
        return "maximize"
    return None


def directions(
    direction: str | Sequence[str] | None, objectives: Sequence[str] | None, monitor: str, mode: str
) -> list[str]:
    """One direction per objective: as given, else from the metric; a given one must not contradict its metric."""
    from lab.errors import UserError

    given = (
        None
        if direction is None
        else list(direction)
        if isinstance(direction, (list, ListConfig))
        else [str(direction)]
    )
    names = list(objectives) if objectives else [monitor]
    known = [metric_direction(n) for n in names] if objectives else [f"{mode}imize"]
    if given is None:
        unknown = [n for n, d in zip(names, known, strict=True) if d is None]
        if unknown:
            raise UserError(f"cannot tell whether {', '.join(unknown)} should be maximized or minimized",
                            "hydra.sweeper.direction", "give one direction per objective, e.g. "
                            f"hydra.sweeper.direction=[{','.join(d or 'minimize' for d in known)}]")  # fmt: skip
        return known
    if len(given) == len(names):
        for name, want, got in zip(names, known, given, strict=True):
            if want is not None and got != want:
                key = "checkpoint.mode" if not objectives else "hydra.sweeper.direction"
                raise UserError(f"the objective {name} would be {got}d, but better is {want}d "
                                f"({'checkpoint.mode=' + mode if not objectives else 'its name says so'})", key,
                                "leave hydra.sweeper.direction unset (it follows the metric) or give the other "
                                "direction")  # fmt: skip
    return given


class LabOptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: DictConfig,
        pruner: DictConfig | None,
        storage: Any,
        study_name: str,
        direction: str | Sequence[str] | None = None,
        objectives: Sequence[str] | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        max_failure_rate: float = 0.0,
        params: DictConfig | None = None,
    ) -> None:
        self.sampler_cfg, self.pruner_cfg, self.storage_cfg = sampler, pruner, storage
        self.study_name = study_name
        self.direction = direction  # None: from the metric (`directions`, in `setup`)
        self.objectives = list(objectives) if objectives else None
        self.n_trials, self.n_jobs, self.max_failure_rate = (
            int(n_trials),
            int(n_jobs),
            float(max_failure_rate),
        )
        self.params = params
        self.interrupted: list[Any] = []  # trials an interrupted run of this sweep left RUNNING

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from lab.errors import UserError

        self.config = config
        self.hydra_context = hydra_context
        try:
            self.directions = directions(self.direction, self.objectives, str(config.checkpoint.monitor),
                                         str(config.checkpoint.mode))  # fmt: skip
        except UserError as e:
            e.exit()
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> Any:
        from lab.errors import UserError

        try:
            study, space, fixed = self._prepare(arguments)
        except UserError as e:
            e.exit()
        return self._run(study, space, fixed)

    # ---------------------------------------------------------------- set-up
    def _check(self) -> None:
        from lab.errors import UserError

        if any(d not in ("maximize", "minimize") for d in self.directions):
            raise UserError(f"must be maximize or minimize, got {self.directions}", "hydra.sweeper.direction",
                            "set checkpoint.mode=max|min, or direction=[maximize,minimize]")  # fmt: skip
        if len(self.directions) > 1 and len(self.objectives or []) != len(self.directions):
            raise UserError(f"{len(self.directions)} directions need as many objectives",
                            "hydra.sweeper.objectives", "list metrics.json keys, e.g. [val/acc,val/loss]")  # fmt: skip
        if self.objectives and len(self.objectives) != len(self.directions):
            raise UserError(f"{len(self.objectives)} objectives but {len(self.directions)} directions",
                            "hydra.sweeper.direction", "give one direction per objective")  # fmt: skip
        if len(self.directions) > 1 and self.pruner_cfg:
            raise UserError("Optuna prunes single-objective studies only", "hydra.sweeper.pruner",
                            "use hydra/sweeper/pruner=none with several objectives")  # fmt: skip
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise UserError(
                f"must be in [0, 1], got {self.max_failure_rate}", "hydra.sweeper.max_failure_rate"
            )

    def _prepare(self, arguments: list[str]) -> tuple[Any, dict[str, Any], dict[str, str]]:
        import optuna
        from hydra.utils import instantiate

        from lab.errors import UserError
        from lab.optuna_trial import build_pruner, open_storage

        self._check()
        params = [f"{k}={v}" for k, v in (self.params or {}).items()]
        try:
            space, fixed = search_space([*params, *arguments])
        except ValueError as e:
            raise UserError(str(e), "hydra.sweeper.params", "e.g. 'optimizer.lr=tag(log, interval(1e-4, 1e-2))'") from None  # fmt: skip
        sampler_kwargs: dict[str, Any] = {}
        if str(self.sampler_cfg.get("_target_", "")).endswith("GridSampler"):
            sampler_kwargs["search_space"] = grid(space)
            size = math.prod(len(v) for v in sampler_kwargs["search_space"].values())
            if size < self.n_trials:
                log.info("the grid has %d points: n_trials %d → %d", size, self.n_trials, size)
                self.n_trials = size
        try:
            sampler = instantiate(self.sampler_cfg, **sampler_kwargs)
        except Exception as e:  # e.g. CmaEsSampler without the cmaes package
            cause = e.__cause__ or e
            raise UserError(f"sampler {self.sampler_cfg.get('_target_')} failed: {cause}", "hydra/sweeper/sampler",
                            "pip install what it names, or choose tpe, random or grid") from None  # fmt: skip
        storage = open_storage(self.storage_cfg)
        study = optuna.create_study(study_name=self.study_name, storage=storage, sampler=sampler,
                                    pruner=build_pruner(self.pruner_cfg), directions=self.directions,
                                    load_if_exists=True)  # fmt: skip
        if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in self.directions]:
            raise UserError(f"study {self.study_name!r} already exists with other directions", "hydra.sweeper.direction",
                            "use a new sweep dir or study_name")  # fmt: skip
        # optuna-dashboard and the report name the objectives after the metrics (not "Objective 0").
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(
                self.objectives or [str(OmegaConf.select(self.config, "checkpoint.monitor"))]
            )
        self._resume(study)
        log.info("study %r: sampler %s, pruner %s, %s", self.study_name, type(sampler).__name__,
                 type(study.pruner).__name__, "/".join(self.directions))  # fmt: skip
        return study, space, fixed

    def _resume(self, study: Any) -> None:
        from optuna.trial import TrialState

        self.interrupted = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for trial in self.interrupted:
            log.warning("trial %d was left running by an interrupted sweep: its job continues from its last.pt",
                        trial.number)  # fmt: skip
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get(RETRY_OF) for t in trials}
        for trial in trials:
            if trial.state == TrialState.FAIL and trial.number not in retried:
                study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
                log.warning("trial %d failed in an earlier run of this sweep: run again as a new trial with its "
                            "parameters", trial.number)  # fmt: skip
        if trials:
            study.sampler.reseed_rng()  # its seed would propose the study's first trials again
            done = done_trials(study)
            log.info("resuming study %r: %d finished trials, %d to go", self.study_name, done,
                     max(0, self.n_trials - done))  # fmt: skip

    # ---------------------------------------------------------------- the loop
    def _run(self, study: Any, space: dict[str, Any], fixed: dict[str, str]) -> list[JobReturn]:
        import optuna

        returns: list[JobReturn] = []
        for frozen in self.interrupted:  # the same job number, params and folder: lab.sweep resumes it
            trial = optuna.trial.Trial(study, frozen._trial_id)
            overrides = tuple(f"{k}={v}" for k, v in {**frozen.params, **fixed}.items())
            ret = self.launcher.launch([overrides], initial_job_idx=frozen.number)[0]
            self._tell(study, trial, ret)
            returns.append(ret)
        while (to_go := self.n_trials - done_trials(study)) > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, to_go))]
            first = trials[0].number
            if [t.number for t in trials] != list(range(first, first + len(trials))):
                raise RuntimeError(
                    f"another process asked trials of study {self.study_name!r} at the same time"
                )
            overrides = [tuple(f"{k}={v}" for k, v in {**trial.params, **fixed}.items()) for trial in trials]
            batch = self.launcher.launch(overrides, initial_job_idx=first)
            crashed = [ret for ret in batch if ret.status == JobStatus.FAILED]
            for trial, ret in zip(trials, batch, strict=True):
                self._tell(study, trial, ret)
            returns.extend(batch)
            if crashed and len(crashed) / len(batch) > self.max_failure_rate:
                log.error("%d of %d jobs crashed (max_failure_rate=%s)", len(crashed), len(batch),
                          self.max_failure_rate)  # fmt: skip
                _ = crashed[0].return_value  # re-raises the job's exception with its traceback
        self._write_results(study)
        return returns

    def _tell(self, study: Any, trial: Any, ret: JobReturn) -> None:
        from optuna.trial import TrialState

        tell = functools.partial(tell_study, study, trial)
        if ret.status == JobStatus.FAILED:
            log.warning("trial %d failed: the job raised %r", trial.number, ret._return_value)
            tell(state=TrialState.FAIL)
            return
        metrics = job_metrics(ret)
        if metrics.get("status") == "pruned":
            log.info("trial %d pruned after epoch %s", trial.number, metrics.get("epochs"))
            tell(state=TrialState.PRUNED)
            return
        values = [metrics.get(key) for key in self.objectives] if self.objectives else [ret.return_value]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            log.warning("trial %d failed: the job returned %s (see its metrics.json and train.log)",
                        trial.number, values)  # fmt: skip
            tell(state=TrialState.FAIL)
            return
        tell(values=[float(v) for v in values])

    def _write_results(self, study: Any) -> None:
        """`optimization_results.yaml` in the sweep dir: the best trial(s), as hydra-optuna-sweeper wrote it."""
        best = study.best_trials
        if not best:
            log.warning("no trial of study %r completed (see the sweep summary)", self.study_name)
            return
        if len(self.directions) == 1:
            results = {"name": "optuna", "best_params": best[0].params, "best_value": best[0].value}
        else:
            results = {
                "name": "optuna",
                "solutions": [{"params": t.params, "values": t.values} for t in best],
            }
        path = Path(self.config.hydra.sweep.dir) / "optimization_results.yaml"
        OmegaConf.save(OmegaConf.create(results), path)
        log.info("best trial(s): %s", path)


RETRY_OF = "retry_of"  # user attribute of a trial that runs a failed trial's parameters again


def done_trials(study: Any) -> int:
    """The finished trials that count towards `n_trials`: a FAIL trial that is run again counts through its retry."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF) for t in trials}
    return sum(t.state.is_finished() and t.number not in retried for t in trials)


def tell_study(study: Any, trial: Any, **kwargs: Any) -> None:
    """`study.tell`; the grid sampler's `study.stop()` when the grid is done only works inside `optimize()`, and
    its RuntimeError comes after the trial's state is stored: ignore it (the loop ends by n_trials)."""
    try:
        study.tell(trial, **kwargs)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def job_metrics(ret: JobReturn) -> dict[str, Any]:
    """The job's metrics.json (empty if it wrote none), found through its own Hydra config."""
    output_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
    if output_dir is None:
        return {}
    try:
        return json.loads((Path(output_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
