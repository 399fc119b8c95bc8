"""`metrics.csv`: one row per logging step (step, epoch, then every metric), readable by pandas."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lab.loggers import Logger


class CSVLogger(Logger):
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.columns: list[str] = ["step"]
        self.rows: list[dict[str, Any]] = []  # every row, to rewrite the file when a new metric appears
        self.pending: dict[str, Any] | None = None
        self.resume_step: int | None = None
        self.pending_on_disk = False  # the pending row was written for a checkpoint (see state_dict)

    def resume(self, global_step: int, state: Mapping[str, Any]) -> None:
        # Keep the rows of the interrupted run up to the checkpoint; drop the ones past it.
        if self.path.is_file():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [row for row in reader if int(row["step"]) <= global_step]
            self._rewrite()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.pending is not None and self.pending["step"] != step:
            self._flush()
        if self.pending is None:
            self.pending = {"step": step}
        self.pending.update(metrics)

    def _flush(self) -> None:
        row, self.pending = self.pending, None
        if row is None:
            return
        self.rows.append(row)
        new = [key for key in row if key not in self.columns]
        if new or not self.path.exists() or self.pending_on_disk:
            self.pending_on_disk = False
            self.columns += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)

    def _rewrite(self, extra: list[dict[str, Any]] = ()) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows([*self.rows, *extra])

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint is being written: put the pending row on disk too, so that a run killed right after it
        and resumed from it keeps that row (it stays pending, as more metrics of the same step may follow)."""
        if self.pending is not None:
            self.columns += [key for key in self.pending if key not in self.columns]
            self._rewrite([self.pending])
            self.pending_on_disk = True
        return {}

    def close(self, status: str = "success") -> None:
        self._flush()
