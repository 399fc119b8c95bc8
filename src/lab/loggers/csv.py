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

    def resume(self, global_step: int, state: Mapping[str, Any]) -> None:
        """Keep exactly the rows the checkpoint had seen (continuing in the same run dir); drop later ones."""
        self.pending = dict(state["pending"]) if state.get("pending") else None
        if not self.path.is_file():
            return
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            self.columns = list(reader.fieldnames or ["step"])
            rows = list(reader)
        if "rows" in state:
            self.rows = rows[: state["rows"]]
        else:  # a checkpoint without CSV state: cut by step
            self.rows = [row for row in rows if int(row["step"]) <= global_step]
        self.columns += [key for key in self.pending or {} if key not in self.columns]
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
        if new or not self.path.exists():
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
        """Where the file stands: the rows written so far and the row still collecting metrics of its step."""
        return {"rows": len(self.rows), "pending": dict(self.pending) if self.pending else None}

    def close(self, status: str = "success") -> None:
        self._flush()
