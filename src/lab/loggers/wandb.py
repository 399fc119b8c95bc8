"""Weights & Biases: one W&B run per training job, files under `<run dir>/wandb/`.

`import wandb` happens here only, when `logger=wandb` (or `many`) is chosen. The run starts on first use, after
`resume()` has had the chance to hand over the id of the interrupted run, so that a resumed job continues it.
Without an API key (no `WANDB_API_KEY`, no `~/.netrc` entry) and with no mode forced, the run is offline and one
line says how to upload it later; an online start that fails (no network) also falls back to offline, except
under a W&B sweep agent (`WANDB_SWEEP_ID`), where an offline run could never report back: that is an error.

Secrets: the run name and group (built from the overrides) and W&B's record of the command line have the values
of secret-looking overrides masked (`lab.redact`), like everything else a run writes.
"""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from lab.config import WandbLoggerConfig
from lab.errors import UserError
from lab.loggers import Logger
from lab.redact import redact_override, scrub_text, secret_values

if TYPE_CHECKING:
    from torch import Tensor, nn

log = logging.getLogger(__name__)


def has_api_key() -> bool:
    """What `wandb login` would find: the environment variable or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def secret_override_values() -> set[str]:
    """Values of the secret-looking command-line overrides (`+paths.hf_token=...`) of this Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    secrets = {}
    for override in HydraConfig.get().overrides.task:
        key, _, value = override.partition("=")
        secrets[key.lstrip("+~")] = value
    return secret_values(secrets)


def default_name() -> str | None:
    """The Hydra job name plus its overrides, e.g. `train:model=mlp,optimizer.lr=0.01` (secrets masked)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    job = HydraConfig.get().job
    name = f"{job.name}:{job.override_dirname}" if job.override_dirname else job.name
    return scrub_text(name, secret_override_values())


def default_group() -> str | None:
    """The W&B sweep id under `wandb agent`; the sweep folder's name in a multirun: a sweep's jobs together."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if os.environ.get("WANDB_SWEEP_ID"):
        return f"sweep-{os.environ['WANDB_SWEEP_ID']}"
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """W&B records `sys.argv` (the run's "command"/args): show it secret overrides masked while it looks."""
    original = sys.argv
    secrets = secret_override_values() | secret_values()
    sys.argv = [scrub_text(redact_override(arg), secrets) for arg in original]
    try:
        yield
    finally:
        sys.argv = original


def agent_argv(argv: list[str]) -> list[str]:
    """Under `wandb agent` (WANDB_SWEEP_ID set): W&B's `key=value` arguments → Hydra overrides.

    W&B writes Python values: `None` becomes Hydra's `null`; a value with a comma (Hydra would read a sweep) is
    quoted; `-m` is refused: each agent process is one run of the W&B sweep, Hydra must not sweep again.
    """
    if not os.environ.get("WANDB_SWEEP_ID"):
        return argv
    if "-m" in argv or "--multirun" in argv:
        UserError("a W&B sweep agent runs one job per process", "-m",
                  "remove -m / --multirun from the sweep's command").exit()  # fmt: skip
    fixed = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not arg.startswith("-"):
            if value == "None":
                value = "null"
            elif "," in value and value[:1] not in "[{'\"":
                value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
            arg = f"{key}={value}"
        fixed.append(arg)
    return fixed


class WandbLogger(Logger):
    def __init__(
        self,
        save_dir: str,
        project: str = WandbLoggerConfig.project,
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        mode: str | None = None,
        watch: Mapping[str, Any] | None = None,
        log_checkpoints: bool | str = False,
        checkpoint_dir: str | None = None,
        init_timeout: float = WandbLoggerConfig.init_timeout,
        summary: Mapping[str, str] | None = None,
    ) -> None:
        try:
            import wandb
        except ImportError as e:
            raise UserError(
                "wandb is not installed", "logger", "pip install wandb (or `pip install -e .[wandb]`)"
            ) from e
        self.wandb = wandb
        self.save_dir = Path(save_dir)
        secrets = secret_override_values() | secret_values()
        self.init_kwargs = {
            "project": project,
            "entity": entity,
            "name": scrub_text(name or default_name() or "", secrets) or None,
            "group": scrub_text(group or default_group() or "", secrets) or None,
            "tags": list(tags or []),
            "notes": notes,
        }
        self.mode, self.init_timeout = mode, init_timeout
        self.watch_cfg = dict(watch or {})
        self.log_checkpoints, self.checkpoint_dir = log_checkpoints, checkpoint_dir
        self.summary = dict(summary or {})
        self.config: dict[str, Any] = {}
        self.id: str | None = None
        self.resumed_from_step: int | None = None  # set when this process continues the run of a checkpoint
        self._run = None
        self._uploaded: dict[str, tuple[int, int]] = {}  # checkpoint file → (inode, mtime) last uploaded

    # ------------------------------------------------------------ the run
    @property
    def run(self):
        if self._run is None:
            self.start()
        return self._run

    def start(self) -> None:
        self._run = self._init()
        self.id = self._run.id
        # Offline, W&B cannot tell that a run resumed (its `resumed` comes from the server): lab records it.
        if self.resumed_from_step is not None:
            self._run.summary["lab/resumed_from_step"] = self.resumed_from_step
        for metric, how in self.summary.items():  # e.g. val/acc: max → summary holds the best value
            self._run.define_metric(metric, summary=how)

    def _init(self):
        wandb = self.wandb
        self.save_dir.mkdir(parents=True, exist_ok=True)
        # W&B's own record of a resume (the run record's `resume`, offline too): only for a continued run.
        resume = "allow" if self.resumed_from_step is not None else None
        kwargs = dict(self.init_kwargs, dir=str(self.save_dir), config=self.config, id=self.id, resume=resume)
        settings = wandb.Settings(init_timeout=self.init_timeout, console="off")
        mode = self.mode or os.environ.get("WANDB_MODE")
        if mode is None and not has_api_key():
            mode = "offline"
            self._say_offline("no W&B API key found (WANDB_API_KEY or ~/.netrc)")
        elif mode == "offline":
            self._say_offline("offline mode")
        with redacted_argv():
            if mode is not None:
                return wandb.init(**kwargs, mode=mode, settings=settings)
            try:
                return wandb.init(**kwargs, settings=settings)
            except Exception as e:  # CommError/UsageError/timeouts: no network, bad key, server down
                self._say_offline(
                    f"W&B online start failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
                )
                return wandb.init(**kwargs, mode="offline", settings=settings)

    def _say_offline(self, why: str) -> None:
        if os.environ.get("WANDB_SWEEP_ID"):
            raise UserError(
                f"{why}: a W&B sweep run cannot log offline, it could never report back to the sweep",
                "logger.wandb.mode",
                "give the agent an API key (wandb login or WANDB_API_KEY) and network, or leave mode=null",
            )
        log.warning(
            "%s: logging offline; upload later with `wandb sync %s/wandb/offline-run-*`", why, self.save_dir
        )

    # ------------------------------------------------------------ Logger
    def resume(self, global_step: int, state: Mapping[str, Any]) -> None:
        if state.get("id"):  # same run id → W&B continues the run (resume="allow")
            self.id, self.resumed_from_step = state["id"], global_step

    def state_dict(self) -> dict[str, Any]:
        return {"id": self.id} if self.id else {}

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        if self._run is None:
            self.start()  # now, so the config goes in with wandb.init
        else:
            self._run.config.update(self.config, allow_val_change=True)
        hydra_dir = self.save_dir / ".hydra"
        if (hydra_dir / "config.yaml").is_file():  # the tutorials' wandb.save: the config file with the run
            self._run.save(str(hydra_dir / "*.yaml"), base_path=str(self.save_dir), policy="now")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)
        if (
            self.log_checkpoints == "all" and "epoch" in metrics
        ):  # an epoch ended: the newest complete last.pt
            self._log_checkpoint("last.pt", ["last"])

    def log_hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        # The config is already the run's config; the final metrics go to the summary, next to best/last values.
        self.run.summary.update(dict(metrics))

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        # No step: attached to the next logged step (a resumed run's history is already past `step`).
        self.run.log({tag: self.wandb.Html(f"<pre>{_escape(text)}</pre>")}, commit=False)

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        self.run.log({tag: self.wandb.Image(figure)}, step=step)

    def log_images(self, tag: str, images: Tensor, step: int) -> None:
        self.run.log({tag: [self.wandb.Image(image) for image in images.detach().float().cpu()]}, step=step)

    def log_histogram(self, tag: str, values: Tensor, step: int) -> None:
        if self.watch_cfg.get("log") and tag.startswith(("weights/", "grads/")):
            return  # wandb.watch logs parameters/* and gradients/* itself: no second copy
        self.run.log({tag: self.wandb.Histogram(values.detach().float().cpu().numpy())}, step=step)

    def log_pr_curves(
        self, tag: str, targets: Tensor, probs: Tensor, class_names: list[str], step: int
    ) -> None:
        # wandb.plot.pr_curve needs pandas; the same chart from a table built here does not.
        from sklearn.metrics import precision_recall_curve

        targets, probs = targets.cpu().numpy(), probs.float().cpu().numpy()
        table = self.wandb.Table(columns=["class", "recall", "precision"])
        for index, name in enumerate(class_names):
            if not (targets == index).any():
                continue
            precision, recall, _ = precision_recall_curve(targets == index, probs[:, index])
            keep = range(0, len(recall), max(1, len(recall) // 100))  # at most ~100 points per class
            for i in keep:
                table.add_data(name, round(float(recall[i]), 4), round(float(precision[i]), 4))
        fields = {"x": "recall", "y": "precision", "class": "class"}
        titles = {"title": tag, "x-axis-title": "Recall", "y-axis-title": "Precision"}
        chart = self.wandb.plot_table("wandb/area-under-curve/v0", table, fields, titles)
        self.run.log({tag: chart}, step=step)

    def log_embedding(
        self, tag: str, features: Tensor, labels: list[str], images: Tensor | None, step: int
    ) -> None:
        # A table with one row per point: W&B's embedding projector panel works on its numeric columns.
        features = features.float().cpu()
        columns = ["label", "image", *(f"f{i}" for i in range(features.shape[1]))]
        table = self.wandb.Table(columns=columns)
        for i, row in enumerate(features.tolist()):
            image = self.wandb.Image(images[i].float().cpu()) if images is not None else None
            table.add_data(labels[i], image, *row)
        self.run.log({tag: table}, step=step)

    def watch(self, model: nn.Module) -> None:
        """`model`: the module that runs each step (the head alone when backbone features are cached)."""
        if self.watch_cfg.get("log"):
            # idx=0: W&B numbers watched models per process ("parameters/graph_1…" for the second), so the jobs
            # of an in-process sweep or a second lab.fit in a notebook would each chart under other names.
            self.run.watch(
                model, log=self.watch_cfg["log"], log_freq=int(self.watch_cfg.get("log_freq", 100)), idx=0
            )

    def log_export(self, path: Path) -> None:
        """The export folder as a version of the `model-<run id>` artifact (alias `export`)."""
        artifact = self.wandb.Artifact(f"model-{self.run.id}", type="model", metadata={"export": True})
        artifact.add_dir(str(path))
        self.run.log_artifact(artifact, aliases=["export"])

    def close(self, status: str = "success") -> None:
        if self._run is None:
            return
        if status == "success" and self.log_checkpoints and self.checkpoint_dir:
            self._log_checkpoints()
        self._run.finish(exit_code=0 if status == "success" else 1)
        self._run = None  # a multirun's next job starts its own run

    def _log_checkpoints(self) -> None:
        self._log_checkpoint("best.pt", ["best"])
        if self.log_checkpoints == "all":
            self._log_checkpoint("last.pt", ["last"])

    def _log_checkpoint(self, file: str, aliases: list[str]) -> None:
        """A new version of the `model-<run id>` artifact, unless this file was uploaded as it is now."""
        if not self.checkpoint_dir:
            return
        path = Path(self.checkpoint_dir) / file
        try:
            stat = path.stat()
        except FileNotFoundError:
            return
        if self._uploaded.get(file) == (stat.st_ino, stat.st_mtime_ns):
            return
        artifact = self.wandb.Artifact(f"model-{self.id}", type="model", metadata={"file": file})
        artifact.add_file(str(path))  # copied to W&B's staging area: a later atomic replace cannot tear it
        self.run.log_artifact(artifact, aliases=aliases)
        self._uploaded[file] = (stat.st_ino, stat.st_mtime_ns)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
