"""What is logged besides the scalars, driven by `conf/monitor/*.yaml`: a callback on the Trainer's hooks.

Model graph and a grid of training images once at the start; weight/gradient histograms every N steps; a
"predictions vs. actuals" figure on a fixed validation batch every N epochs; a confusion matrix and per-class
precision-recall curves on val/test; an embedding projector of penultimate features at the end (the last two on
the final weights, tagged `final/<stage>/...` and titled with the weights they show). The task says which figures
apply to it (`Task.figures`). Under DDP the figures cover the whole split: every rank's predictions are gathered
(every rank runs the hooks; rank 0 logs). Everything goes to the logger fan-out (each backend shows what it can),
and nothing runs when no process has a logger. matplotlib is imported only when a figure is on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from lab.callbacks.base import Callback

log = logging.getLogger(__name__)


def plain(node: Any) -> Any:
    """Nested dicts → attribute access, as on the config, at plain-attribute cost."""
    return SimpleNamespace(**{k: plain(v) for k, v in node.items()}) if isinstance(node, dict) else node


def due(every: int | None, count: int) -> bool:
    return bool(every) and count % every == 0


class Monitor(Callback):
    def __init__(
        self,
        settings: DictConfig | None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        """`settings`: `conf/monitor/<option>.yaml` (None: nothing). `mean`/`std`: the images' normalisation."""
        self.cfg = plain(
            OmegaConf.to_container(settings or default_settings(), resolve=True)
        )  # no lookups per step
        self.mean = torch.tensor(list(mean or [0.0]), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std or [1.0]), dtype=torch.float32).view(1, -1, 1, 1)
        self.fixed_batch: tuple[Tensor, Tensor] | None = None
        self.histogram_epoch: int | None = None
        self.epoch_batches = 0  # training batches in the current epoch (set at its start)  # the last epoch that got weight/gradient histograms
        self.batches_are_images = True  # false for tables, or a frozen backbone's cached features
        self.figures: frozenset[str] = frozenset()  # what the task can draw (set at the start)
        self.class_names: list[str] = []
        self.active = False  # some process has a logger (the same on every rank: they gather together)

    def drawn(self, name: str) -> bool:
        """A figure that is switched on and that the task can draw."""
        return getattr(self.cfg, name).enabled and name in self.figures

    def labels(self, targets: Tensor) -> list[str]:
        """Names of the targets: class names, the labels of multi-hot rows, or the values (regression)."""
        if targets.ndim == 2 and self.class_names:  # multi-label: the labels that are on
            return [
                ";".join(n for n, on in zip(self.class_names, row, strict=False) if on)
                for row in targets.tolist()
            ]
        if targets.is_floating_point() or not self.class_names:
            return [
                " ".join(f"{v:.3g}" for v in row)
                for row in targets.float().reshape(len(targets), -1).tolist()
            ]
        return [self.class_names[i] for i in targets.tolist()]

    # ------------------------------------------------------------ helpers
    def images(self, x: Tensor) -> Tensor:
        """Normalised model inputs → displayable images in [0, 1] on the CPU."""
        x = x.detach().float().cpu()
        return (x * self.std + self.mean).clamp_(0, 1)

    def first_samples(self, trainer: Any, stage: str, count: int) -> tuple[Tensor, Tensor]:
        """The first `count` samples of a split, without touching the global RNG (runs stay reproducible)."""
        xs, ys, n = [], [], 0
        with torch.random.fork_rng(devices=[]):
            for x, y in trainer.loaders[stage]:
                xs.append(x[: count - n])
                ys.append(y[: count - n])
                n += len(xs[-1])
                if n >= count:
                    break
        return torch.cat(xs), torch.cat(ys)

    @torch.inference_mode()
    def predict(self, trainer: Any, stage: str) -> tuple[Tensor, Tensor]:
        """Probabilities (softmax, or sigmoid for multi-label tasks) and targets over a split (as far as
        `trainer.limit_<stage>_batches` goes), from every rank under DDP."""
        probs, targets = [], []
        multilabel = trainer.task.output == "sigmoid"
        for logits, _, y in trainer.outputs(stage, trainer.batch_limit(stage)):
            probs.append(logits.float().sigmoid() if multilabel else logits.float().softmax(1))
            targets.append(y)
        return gather(torch.cat(probs).cpu()), gather(torch.cat(targets).cpu())

    # ------------------------------------------------------------ hooks
    def setup(self, trainer: Any) -> None:
        self.figures, self.class_names = trainer.task.figures, list(trainer.class_names)
        self.active = any_rank(bool(trainer.loggers), trainer.device)
        if self.active:  # no pass over the data when nothing is logged
            self.batches_are_images = self.first_samples(trainer, "val", 1)[0].ndim == 4

    def on_fit_start(self, trainer: Any) -> None:
        cfg, loggers, step = self.cfg, trainer.loggers, trainer.state.global_step
        self.setup(trainer)
        if not loggers:
            return
        self.fixed_batch = self.first_samples(trainer, "val", max(cfg.predictions.count, 1))
        if trainer.network.fsdp and (cfg.graph or cfg.histograms.enabled or self.drawn("predictions")
                                     or cfg.embedding.enabled):  # fmt: skip
            log.info("monitor: under fsdp no rank holds the whole model: no graph, histograms, prediction figure "
                     "or embedding")  # fmt: skip
        if not self.batches_are_images:
            log.info("monitor: the batches are not images (a table, or cached backbone features): no graph, "
                     "image grid, prediction figure or embedding thumbnails")  # fmt: skip
            return
        if cfg.graph and not trainer.network.fsdp:
            was_training = trainer.model.training
            trainer.model.eval()
            try:
                loggers.log_graph(trainer.model, trainer.prepare(self.fixed_batch[0][:1]))
            except Exception as e:  # tracing fails for some models: a missing graph must not stop training
                log.warning("model graph not logged (%s: %s)", type(e).__name__, e)
            trainer.model.train(was_training)
        if cfg.train_images.enabled:
            x, _ = self.first_samples(trainer, "train", cfg.train_images.count)
            loggers.log_images("train/images", upscale(self.images(x)), step)

    def on_train_epoch_start(self, trainer: Any) -> None:
        # Read once per epoch: an OmegaConf lookup in every step would cost more than the check itself.
        self.epoch_batches = trainer.train_batches

    def on_after_backward(self, trainer: Any) -> None:
        """Every `every_n_steps`, and on an epoch's last step when none was due in it: short runs show them too."""
        step = trainer.state.global_step + 1  # the optimizer step about to be taken, as in log_metrics
        if not trainer.loggers or not self.cfg.histograms.enabled or trainer.network.fsdp:
            return
        epoch = trainer.state.epoch
        if not due(self.cfg.histograms.every_n_steps, step) and not (
            self.histogram_epoch != epoch and trainer.state.batch_in_epoch >= self.epoch_batches
        ):
            return
        self.histogram_epoch = epoch
        values = {}
        for name, param in trainer.model.named_parameters():
            values[f"weights/{name}"] = param
            if param.grad is not None:
                values[f"grads/{name}"] = param.grad
        trainer.loggers.log_histograms(values, step)

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        cfg, epoch = self.cfg, trainer.state.epoch
        if not self.active:
            return
        if (
            trainer.loggers
            and self.drawn("predictions")
            and self.batches_are_images
            and not trainer.network.fsdp
            and due(cfg.predictions.every_n_epochs, epoch)
        ):
            self.log_predictions(trainer)
        if (self.drawn("confusion_matrix") and due(cfg.confusion_matrix.every_n_epochs, epoch)) or (
            self.drawn("pr_curves") and due(cfg.pr_curves.every_n_epochs, epoch)
        ):
            self.log_classification(trainer, "val", every_epoch=True)

    def on_final_evaluation(self, trainer: Any, metrics: dict[str, float]) -> None:
        """After training, on the weights `metrics.json` reports (`trainer.evaluated_weights` says which), also
        for `train=false` runs; tagged `final/...`, apart from the epochs' figures."""
        self.setup(trainer)
        if not self.active:
            return
        if self.drawn("confusion_matrix") or self.drawn("pr_curves"):
            for stage in self.cfg.stages:
                if stage == "test" and not any(name.startswith("test/") for name in metrics):
                    continue  # `test=false`: the test split is not looked at
                self.log_classification(trainer, stage, every_epoch=False)
        if self.cfg.embedding.enabled and not trainer.network.fsdp:
            self.log_embedding(trainer)

    # ------------------------------------------------------------ what is logged
    def log_predictions(self, trainer: Any) -> None:
        x, y = self.fixed_batch
        with torch.inference_mode():
            was_training = trainer.model.training
            trainer.model.eval()
            with trainer.autocast():
                preds = trainer.eval_model(trainer.prepare(x)).argmax(1).cpu()
            trainer.model.train(was_training)
        figure = predictions_figure(self.images(x), preds, y.cpu(), self.class_names)
        trainer.loggers.log_figure("val/predictions", figure, trainer.state.global_step)

    def log_classification(self, trainer: Any, stage: str, every_epoch: bool) -> None:
        """Confusion matrix and PR curves of `stage`; per epoch only those whose `every_n_epochs` is due."""
        cfg, epoch, step = self.cfg, trainer.state.epoch, trainer.state.global_step
        probs, targets = self.predict(trainer, stage)
        if not trainer.loggers:  # another rank logs what all of them gathered
            return
        tag = stage if every_epoch else f"final/{stage}"
        title = f"{stage}, epoch {epoch}" if every_epoch else f"{stage}, {final_weights(trainer)}"
        if self.drawn("confusion_matrix") and (
            not every_epoch or due(cfg.confusion_matrix.every_n_epochs, epoch)
        ):
            matrix = confusion_matrix(probs.argmax(1), targets, len(self.class_names))
            figure = confusion_figure(matrix, self.class_names, f"{title}: {len(targets)} samples")
            trainer.loggers.log_figure(f"{tag}/confusion_matrix", figure, step)
        if self.drawn("pr_curves") and (not every_epoch or due(cfg.pr_curves.every_n_epochs, epoch)):
            if targets.ndim == 2:  # multi-label: each label present or not, `<tag>/pr_curve/<label>`
                for i, name in enumerate(self.class_names):
                    p = probs[:, i]
                    trainer.loggers.log_pr_curves(f"{tag}/pr_curve", targets[:, i].long(),
                                                  torch.stack([1 - p, p], 1), [f"not {name}", name], step)  # fmt: skip
            else:
                trainer.loggers.log_pr_curves(f"{tag}/pr_curve", targets, probs, self.class_names, step)

    def log_embedding(self, trainer: Any) -> None:
        """The first `embedding.count` validation samples of every rank (gathered under DDP)."""
        model, count = trainer.model, self.cfg.embedding.count
        x, y = self.first_samples(trainer, "val", count)
        if not self.batches_are_images:  # the batches already are the penultimate features
            features, images = x.flatten(1).float(), None
        elif hasattr(model, "features"):
            was_training = model.training
            model.eval()
            with torch.inference_mode(), trainer.autocast():
                features = model.features(trainer.prepare(x)).flatten(1).float()
            model.train(was_training)
            images = gather(self.images(x))[:count]
        else:
            if trainer.loggers:
                log.warning("embedding not logged: %s has no .features (input → penultimate vector)",
                            type(model).__name__)  # fmt: skip
            return
        features, y = gather(features.cpu())[:count], gather(y.cpu())[:count]
        if trainer.loggers:
            trainer.loggers.log_embedding("final/val/features", features, self.labels(y), images,
                                          trainer.state.global_step)  # fmt: skip


def final_weights(trainer: Any) -> str:
    """Which weights the final figures show (set by `lab.train` before the final evaluation)."""
    return getattr(trainer, "evaluated_weights", None) or "final weights"


def any_rank(flag: bool, device: Any) -> bool:
    """`flag` on any process of a DDP job (all must call this together); `flag` itself otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather(values: Tensor) -> Tensor:
    """`values` of every DDP process, concatenated in rank order (shards of different sizes allowed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values.cpu())
    return torch.cat(parts)


def default_settings() -> DictConfig:
    """`conf/monitor/none.yaml`'s switches, all off: a monitor without settings draws nothing."""
    off = {"enabled": False, "every_n_epochs": None, "every_n_steps": None, "count": 0}
    names = ("train_images", "histograms", "predictions", "confusion_matrix", "pr_curves", "embedding")
    return OmegaConf.create({"graph": False, "stages": [], **{name: off for name in names}})


def upscale(images: Tensor, min_size: int = 64) -> Tensor:
    """Small images (8×8 digits) enlarged by an integer factor, pixels kept sharp, so that a grid is legible."""
    factor = -(-min_size // max(1, min(images.shape[-2:])))
    if factor <= 1:
        return images
    return torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")


def confusion_matrix(preds: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Rows: true class, columns: predicted class."""
    index = targets.long() * num_classes + preds.long()
    return torch.bincount(index, minlength=num_classes**2).view(num_classes, num_classes)


def predictions_figure(images: Tensor, preds: Tensor, targets: Tensor, class_names: Sequence[str]) -> Any:
    """A grid of images titled with the predicted class (true class below): green when right, red when wrong."""
    from matplotlib.figure import Figure

    n = len(images)
    cols = min(8, n)
    rows = -(-n // cols)
    figure = Figure(figsize=(1.6 * cols, 1.9 * rows), layout="constrained")
    for i, ax in enumerate(figure.subplots(rows, cols, squeeze=False).flat):
        ax.axis("off")
        if i >= n:
            continue
        image = images[i].permute(1, 2, 0).numpy()
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        right = int(preds[i]) == int(targets[i])
        pred, true = class_names[int(preds[i])][:12], class_names[int(targets[i])][:12]
        ax.set_title(f"{pred}\n(true: {true})", color="green" if right else "red", fontsize=8)
    return figure


def confusion_figure(matrix: Tensor, class_names: Sequence[str], title: str = "") -> Any:
    from matplotlib.figure import Figure

    n = len(class_names)
    size = min(max(4.0, 0.45 * n + 2), 20.0)
    figure = Figure(figsize=(size, size), layout="constrained")
    ax = figure.subplots()
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set(xlabel="predicted", ylabel="true", xticks=range(n), yticks=range(n), title=title)
    ax.set_xticklabels([c[:12] for c in class_names], rotation=90, fontsize=7)
    ax.set_yticklabels([c[:12] for c in class_names], fontsize=7)
    if n <= 20:  # the counts in the cells while they are readable
        threshold = matrix.max().item() / 2
        for i, row in enumerate(matrix.tolist()):
            for j, value in enumerate(row):
                color = "white" if value > threshold else "black"
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color=color)
    return figure
