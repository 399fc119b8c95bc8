"""Progress of a loop: tqdm's bar on a terminal; a plain log line every `every_s` seconds anywhere else.

When output goes to a file (`make train > log`, SLURM, CI), tqdm's carriage-return frames pile up into one
unreadable line; `LogProgress` writes `epoch 3: 120/469 (26%) 41.2 it/s eta 0:08 loss=0.412` lines instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("lab.progress")

EVERY_S = 30.0  # seconds between two lines when output is not a terminal


def progress(
    iterable: Iterable, total: int, initial: int = 0, desc: str = "", stream: Any = None
) -> Iterable:
    """tqdm on a terminal (`stream`, default stderr), `LogProgress` otherwise."""
    stream = stream or sys.stderr
    if hasattr(stream, "isatty") and stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
    return LogProgress(iterable, total, initial, desc)


class LogProgress:
    """Iterates like tqdm (with `set_postfix`), logging one line every `every_s` seconds."""

    def __init__(self, iterable: Iterable, total: int, initial: int = 0, desc: str = "",
                 every_s: float = EVERY_S) -> None:  # fmt: skip
        self.iterable, self.total, self.n, self.desc = iterable, total, initial, desc
        self.every_s = every_s
        self.postfix: dict[str, Any] = {}

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values

    def __iter__(self) -> Iterator:
        start = last = time.perf_counter()
        done_at_start = self.n
        for item in self.iterable:
            yield item
            self.n += 1
            now = time.perf_counter()
            if now - last >= self.every_s:
                last = now
                log.info(self.line(self.n - done_at_start, now - start))

    def line(self, done: int, elapsed: float) -> str:
        rate = done / max(elapsed, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        percent = 100 * self.n / max(self.total, 1)
        postfix = "".join(f" {k}={v}" for k, v in self.postfix.items())
        return (f"{self.desc}: {self.n}/{self.total} ({percent:.0f}%) {rate:.1f} it/s "
                f"eta {int(eta // 60)}:{int(eta % 60):02d}{postfix}")  # fmt: skip
