"""TensorBoard event files under the run dir (`tensorboard/`); `make tensorboard` serves them.

Besides one chart per metric, the Custom Scalars tab has train and val of each metric on one chart (the
tutorials' `add_scalars`, without its extra runs), and the HParams table holds what tells runs apart
(`hparams_table`): the overridden keys, model, dataset, optimizer, lr, batch size ..., not every config key.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lab.config import TensorBoardLoggerConfig
from lab.loggers import Logger

if TYPE_CHECKING:
    from torch import Tensor, nn


class TensorBoardLogger(Logger):
    def __init__(
        self,
        log_dir: str,
        flush_secs: int = TensorBoardLoggerConfig.flush_secs,
        max_queue: int = TensorBoardLoggerConfig.max_queue,
    ) -> None:
        """What each argument means: `TensorBoardLoggerConfig`."""
        self.log_dir, self.flush_secs, self.max_queue = log_dir, flush_secs, max_queue
        self.purge_step: int | None = None
        self._writer = None
        self.layout_written = False

    @property
    def writer(self):
        # Created on first use, so that `resume` can set `purge_step` first and `logger=none` costs no import.
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            use_native_crc()
            self._writer = SummaryWriter(self.log_dir, purge_step=self.purge_step, max_queue=self.max_queue,
                                         flush_secs=self.flush_secs)  # fmt: skip
        return self._writer

    def resume(self, global_step: int, state: Mapping[str, Any]) -> None:
        # Events past the checkpoint were written by the interrupted run: drop them so curves do not fork. Those
        # AT the checkpoint's step are part of it (SummaryWriter purges every step >= purge_step): keep them.
        self.purge_step = global_step + 1

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        if not self.layout_written and any(name.startswith("val/") for name in metrics):
            self.write_layout([name.removeprefix("val/") for name in metrics if name.startswith("val/")])

    def write_layout(self, names: list[str]) -> None:
        """Custom Scalars: one chart per metric with its train and val curves (written once, at the first val)."""
        charts = {name: ["Multiline", [f"^(train|val)/{re.escape(name)}$"]] for name in names}
        self.writer.add_custom_scalars({"train vs val": charts})
        self.layout_written = True

    def log_hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # In this run's own event file (not a sub-run as `add_hparams` does), next to the metric scalars it names.
        allowed = {k: v for k, v in hparams_table(params).items() if isinstance(v, (bool, int, float, str))}
        for summary in hparams(allowed, dict(metrics)):
            self.writer.file_writer.add_summary(summary)

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        # Markdown: indent by four spaces so YAML and tables render as code.
        self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        self.writer.add_figure(tag, figure, step, close=False)

    def log_images(self, tag: str, images: Tensor, step: int) -> None:  # small ones arrive upscaled
        self.writer.add_images(tag, images.detach().float().cpu(), step)  # a grid in one image

    def log_histogram(self, tag: str, values: Tensor, step: int) -> None:
        self.log_histograms({tag: values}, step)

    def log_histograms(self, values: Mapping[str, Tensor], step: int) -> None:
        import torch

        # Binned by torch where the values are (add_histogram would copy them to numpy, whose BLAS threads then
        # compete with torch's for the CPU), 64 equal-width buckets, with two read-backs for all the tensors.
        tensors = {tag: v.detach().float().flatten() for tag, v in values.items() if v.numel()}
        if not tensors:
            return
        flat = list(tensors.values())
        stats = torch.stack(
            [torch.stack([v.min(), v.max(), v.sum(), v.square().sum()]) for v in flat]
        ).tolist()
        ranges = [(low, max(high, low + 1e-12)) for low, high, _, _ in stats]
        counts = torch.stack(
            [torch.histc(v, bins=64, min=low, max=high) for v, (low, high) in zip(flat, ranges, strict=True)]
        ).tolist()
        for (tag, v), (low, high), (_, top, total, squares), bucket_counts in zip(
            tensors.items(), ranges, stats, counts, strict=True
        ):
            limits = [low + (high - low) * (i + 1) / 64 for i in range(64)]
            self.writer.add_histogram_raw(
                tag, low, top, v.numel(), total, squares, limits, bucket_counts, step
            )

    def log_graph(self, model: nn.Module, example_input: Tensor) -> None:
        import torch

        with warnings.catch_warnings():  # torch.jit warns that it is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            # Traced once, without torch.jit's check (which traces and runs the model twice more, for a drawing):
            # add_graph takes a traced module as it is, with a warning that says so.
            traced = torch.jit.trace(model, example_input, check_trace=False)
            warnings.filterwarnings("ignore", "The input to trace is already a ScriptModule")
            self.writer.add_graph(traced, example_input)

    def log_pr_curves(
        self, tag: str, targets: Tensor, probs: Tensor, class_names: list[str], step: int
    ) -> None:
        targets, probs = targets.cpu(), probs.float().cpu()
        for index, name in enumerate(class_names):
            self.writer.add_pr_curve(f"{tag}/{name}", targets == index, probs[:, index], step)

    def log_embedding(
        self, tag: str, features: Tensor, labels: list[str], images: Tensor | None, step: int
    ) -> None:
        label_img = images.float().cpu() if images is not None else None
        self.writer.add_embedding(features.float().cpu(), labels, label_img, step, tag)

    def close(self, status: str = "success") -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


# Always in the HParams table (when in the config), after the keys given on the command line.
LEADING_KEYS = ("model._target_", "model.name", "dataset.name", "optimizer._target_", "optimizer.lr",
                "optimizer.weight_decay", "scheduler._target_", "dataset.batch_size", "trainer.max_epochs",
                "trainer.seed")  # fmt: skip
GROUPS = ("model", "dataset", "optimizer", "scheduler")


def hparams_table(params: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config cut to what distinguishes runs: overridden/swept keys and group choices first."""
    from hydra.core.hydra_config import HydraConfig

    table: dict[str, Any] = {}
    overridden: list[str] = []
    choices: dict[str, Any] = {}
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        choices = {g: c for g, c in hydra.runtime.choices.items() if c and not g.startswith("hydra")}
        table.update({g: choices[g] for g in GROUPS if g in choices})
        overridden = [o.partition("=")[0].lstrip("+~") for o in hydra.overrides.task]
    for key in [*overridden, *LEADING_KEYS]:
        if key in params:
            table[key] = params[key]
        elif key in choices:  # a group chosen on the command line, e.g. logger=many: its option's name
            table[key] = choices[key]
    return table


def use_native_crc() -> None:
    """Give TensorBoard's event writer a C CRC-32C (google-crc32c) in place of its pure-Python one.

    The writer checksums every event in its own thread, in Python at ~0.1 ms per KB while holding the GIL: a run's
    image grids, figures and histograms then stall the training loop by milliseconds per epoch. Same checksums
    (tests/test_loggers.py compares them); if either library changes shape, the writer keeps its own.
    """
    try:
        import google_crc32c
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return
    if getattr(record_writer, "masked_crc32c", None) is None or google_crc32c.implementation != "c":
        return

    def masked_crc32c(data: bytes) -> int:
        crc = google_crc32c.value(bytes(data))
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    record_writer.masked_crc32c = masked_crc32c
