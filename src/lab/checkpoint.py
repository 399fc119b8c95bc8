"""Checkpoints: atomic writes, safe loading, and the last/best/top-k policy of `conf/checkpoint/*.yaml`.

A checkpoint is a `torch.save`d dict of tensors and plain Python values, loaded with `weights_only=True`:
`model` (plain state_dict), `optimizer`, `scheduler` (main + warm-up), `scaler`, `epoch`, `global_step`, `batch_in_epoch`,
`monitor` (name, mode, best), `callbacks` (their states, e.g. the EMA weights), `config` (resolved, plain dict),
`class_names`, `rng`, `loggers`. `inference_weights(state)` are the weights to evaluate, predict and export with.

What a checkpoint's `model` holds (lean for frozen blocks) and how it is loaded back (`restore_model`,
`inference_weights`) is `lab.models.weights`'s. `ckpt_path=` also takes a plain state_dict (an exported
`model.pt`): weights only, training starts at epoch 0.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lab.errors import UserError
from lab.models.weights import inference_weights as inference_weights  # re-exported: predict, export
from lab.models.weights import model_state
from lab.models.weights import restore_model as restore_model

REQUIRED_KEYS = ("model", "epoch", "global_step")


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def snapshot(obj: Any) -> Any:
    """A copy of `obj` that training cannot change any more: tensors copied to the CPU, dicts and lists rebuilt
    (tuples, e.g. the python RNG state, are immutable and kept as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: snapshot(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [snapshot(value) for value in obj]
    return obj


def serialize(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


TMP_INFIX = ".tmp-"


def write_atomic(data: bytes, path: Path) -> None:
    """Temp file in the same dir, fsync, rename: `path` is always the old or the new complete file.

    A full disk or an unwritable dir is a `UserError` naming the file and the checkpoints that are complete on disk
    (the previous `path` is left as it was).
    """
    _replace_atomic(path, lambda tmp: _write_synced(data, tmp))


def link_atomic(source: Path, path: Path, data: bytes) -> None:
    """`path` as a hard link to `source`, which holds the same `data`: no second copy to write and sync.

    Checkpoints are only ever replaced by rename, never rewritten in place, so linked names stay independent.
    Where the filesystem has no hard links (some network and FAT filesystems), `data` is written instead.
    """

    def link(tmp: Path) -> None:
        try:
            os.link(source, tmp)
        except OSError:
            _write_synced(data, tmp)

    _replace_atomic(path, link)


def _write_synced(data: bytes, path: Path) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_atomic(path: Path, make: Callable[[Path], None]) -> None:
    """`make` the new file under a temp name in `path`'s dir, rename it over `path`, sync the dir."""
    tmp = path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.unlink(missing_ok=True)
            make(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise UserError(
            f"could not write the checkpoint ({e.strerror or type(e).__name__}); {on_disk(path.parent)}",
            str(path),
            "free disk space or point hydra.run.dir / checkpoint.dirpath at a writable place, then resume "
            "from last.pt",
        ) from None


def on_disk(dirpath: Path) -> str:
    """Which checkpoints in `dirpath` are complete (every file there is: they are only ever renamed into place)."""
    try:
        names = sorted(p.name for p in dirpath.glob("*.pt") if p.is_file())
    except OSError:
        names = []
    if not names:
        return f"no checkpoint is on disk in {dirpath} yet"
    return f"complete on disk, as they were: {', '.join(names)}"


def _write_all(state: dict[str, Any], paths: list[Path], dropped: list[Path], sharded: Any = None) -> None:
    """`sharded`: (the `lab.fsdp.ShardedState`, the folder just saved) when `paths[0]` is last.pt of an fsdp run."""
    if sharded is not None:  # only last.pt names the folder and resumes; the others are the weights alone
        sharded[0].wait()  # the folder is complete before last.pt names it
        write_atomic(serialize({**state, "sharded": sharded[1]}), paths[0])
        sharded[0].prune(paths[0].parent, sharded[1])
        paths = paths[1:]
        if not paths:
            return
    data = serialize(state)
    write_atomic(data, paths[0])
    for path in paths[1:]:  # e.g. best.pt in the epoch that also wrote last.pt
        link_atomic(paths[0], path, data)
    for path in dropped:  # top-k files that fell out, only once the new one is complete
        path.unlink(missing_ok=True)


def remove_stale_temp_files(dirpath: Path) -> None:
    """Temp files left by a process killed mid-write (`.last.pt.tmp-<pid>`): never complete, never loaded."""
    for tmp in dirpath.glob(f".*.pt{TMP_INFIX}*"):
        if not tmp.name.endswith(f"{TMP_INFIX}{os.getpid()}"):
            tmp.unlink(missing_ok=True)


def carry_best_over(resume_from: Path, dirpath: Path) -> Path | None:
    """A run resumed into a new folder takes the interrupted run's `best.pt` along (a hard link, or a copy), so its
    final evaluation, metrics.json and export are of the same best weights as without the interruption.

    Only the `best.pt` beside the resumed checkpoint, and only when it holds the best value that checkpoint
    remembers (the same run); an existing `best.pt` in `dirpath` is left alone. Returns the new file, if any.
    """
    source, target = resume_from.parent / "best.pt", dirpath / "best.pt"
    if not source.is_file() or target.exists() or source.resolve() == target.resolve():
        return None
    try:  # mmap: only the small entries are read, not the weights
        monitors = [torch.load(p, mmap=True, weights_only=True).get("monitor") for p in (resume_from, source)]
    except Exception:  # an unreadable file is reported, with its name, when the run loads it
        return None
    if monitors[0] is None or monitors[0] != monitors[1]:
        return None

    def link_or_copy(tmp: Path) -> None:
        try:
            os.link(source, tmp)
        except OSError:  # another filesystem, or none with hard links
            shutil.copyfile(source, tmp)

    _replace_atomic(target, link_or_copy)
    return target


def find_last(log_dir: str | Path, task_name: str) -> Path | None:
    """`resume=auto`: the newest `last.pt` among `<log_dir>/<task_name>/runs/*/checkpoints/`."""
    candidates = [p for p in Path(log_dir, task_name, "runs").glob("*/checkpoints/last.pt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; every failure is a `UserError` naming the file."""
    path = Path(path)
    where = f"ckpt_path={path}"
    if not path.is_file():
        what = "is a directory, not a checkpoint file" if path.is_dir() else "checkpoint file not found"
        raise UserError(what, where, "give the path of a .pt file, e.g. <run dir>/checkpoints/last.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"a pickled Python object ({found[1]})" if found else "pickled Python objects"
        raise UserError(
            f"refused: the file holds {what}, which could run code when loaded",
            where,
            "only load checkpoints written by lab or other plain tensor dicts",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as e:
        raise UserError(
            f"not a readable checkpoint, truncated or corrupt ({type(e).__name__})",
            where,
            "use an intact last.pt/best.pt",
        ) from None
    if is_state_dict(state):  # e.g. export/model.pt: weights only, nothing to resume
        return {"model": state, "epoch": 0, "global_step": 0}
    if isinstance(state, dict) and "sharded" in state:
        # fsdp's last.pt: the model's shards and the optimizer's are in the folder it names, beside it
        state["sharded"] = str(path.parent / state["sharded"])
        if not (Path(state["sharded"]) / ".metadata").is_file():
            raise UserError(f"the sharded state it names is missing or incomplete ({state['sharded']})", where,
                            "keep last.pt and its checkpoints/sharded/ folder together")  # fmt: skip
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise UserError(
            f"not a lab checkpoint: expected keys {', '.join(REQUIRED_KEYS)}, found {found}",
            where,
            "point ckpt_path at a checkpoints/last.pt or best.pt written by train.py",
        )
    return state


def is_state_dict(state: Any) -> bool:
    """A plain `model.state_dict()` (what `torch.save(model.state_dict(), ...)` writes): names → tensors only."""
    return (
        isinstance(state, dict)
        and bool(state)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    )


def is_resumable(state: dict[str, Any]) -> bool:
    """A training checkpoint (optimizer and all, or fsdp's sharded state), not weights alone."""
    return "optimizer" in state or "sharded" in state


class Checkpointer:
    """Writes `last.pt` every `every_n_epochs` (and every `every_n_steps`), `best.pt` by `monitor`/`mode`, and
    keeps the `save_top_k` best as `epoch=NNN-<monitor>=<value>.pt` when `save_top_k > 1`.

    The state is copied at once (`snapshot`: training may go on changing the weights); with `async_write` one
    background thread serialises, writes and fsyncs it while the next epoch trains. Writes stay in order and
    atomic, at most one checkpoint is in flight, and `wait()` (called before the next write, before anything
    reads a checkpoint back and when the run ends) re-raises a failed write.
    """

    def __init__(
        self,
        dirpath: str,
        monitor: str,
        mode: str,
        save_last: bool = True,
        save_top_k: int = 1,
        every_n_epochs: int = 1,
        every_n_steps: int | None = None,
        strict: bool = True,
        async_write: bool = True,
        save_frozen: bool = False,
        write: bool = True,
        sharded: Any = None,
    ) -> None:
        """`write`: false on every rank of a torchrun job but rank 0, which decides as rank 0 and writes no file;
        `sharded`: under fsdp, the model and optimizer shards every rank saves beside each last.pt
        (`lab.fsdp.ShardedState`)."""
        self.dirpath = Path(dirpath)
        self.monitor, self.mode = monitor, mode
        self.save_last, self.save_top_k = save_last, save_top_k
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.strict, self.save_frozen = strict, save_frozen
        self.top_k: list[tuple[float, str]] = []  # (value, file name), best first
        self.async_write = async_write
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self.write, self.sharded = write, sharded
        if self.write and self.enabled and self.dirpath.is_dir():
            remove_stale_temp_files(self.dirpath)

    @property
    def enabled(self) -> bool:
        return self.save_last or self.save_top_k > 0

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.dirpath / "best.pt"

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """`model` and `frozen` entries of a checkpoint (lean unless `save_frozen`): see `model_state`. Under fsdp
        every rank takes part in gathering the whole model to rank 0, and every other gets {}."""
        if self.sharded is not None:
            return {"model": self.sharded.model_state(), "frozen": None}
        return model_state(model, self.save_frozen)

    def step_due(self, global_step: int) -> bool:
        """Asked at every optimizer step, so a background write that failed also stops the run at the next step."""
        if self._pending is not None and self._pending.done():
            self.wait()  # re-raises its error
        return bool(self.save_last and self.every_n_steps and global_step % self.every_n_steps == 0)

    def save_step(self, state: dict[str, Any]) -> None:
        state["checkpointer"] = self.state_dict()  # the top-k list survives a mid-epoch resume too
        self._submit(state, [self.last_path], [])

    def save_epoch(self, state: dict[str, Any], epoch: int, value: float | None, is_best: bool) -> None:
        """After epoch `epoch` (1-based); `value` is the monitored metric, `is_best` whether it improved."""
        last_due = self.save_last and self.every_n_epochs and epoch % self.every_n_epochs == 0
        keep = self.save_top_k > 0 and value is not None and math.isfinite(value)
        if keep and len(self.top_k) >= self.save_top_k and not self._beats(value, self.top_k[-1][0]):
            keep = False
        if not (last_due or (is_best and self.save_top_k > 0) or (keep and self.save_top_k > 1)):
            return
        paths, dropped = [], []
        if last_due:
            paths.append(self.last_path)
        if is_best and self.save_top_k > 0:
            paths.append(self.best_path)  # the previous best.pt stays until this one is complete
        if keep and self.save_top_k > 1:
            name = f"epoch={epoch:03d}-{self.monitor.replace('/', '_')}={value:.4f}.pt"
            paths.append(self.dirpath / name)
            # A mid-epoch validation (trainer.val_check_interval) can give the same name as another of its epoch:
            # the file is replaced, so it stays one entry, never one that a later drop would delete under the other.
            others = [(v, n) for v, n in self.top_k if n != name]
            self.top_k = sorted([*others, (value, name)], key=lambda t: t[0], reverse=self.mode == "max")
            dropped = [self.dirpath / name for _, name in self.top_k[self.save_top_k :]]
            self.top_k = self.top_k[: self.save_top_k]
        state["checkpointer"] = self.state_dict()
        self._submit(state, paths, dropped)

    def _submit(self, state: dict[str, Any], paths: list[Path], dropped: list[Path]) -> None:
        self.wait()
        sharded = None
        if self.sharded is not None:
            state.pop("optimizer", None)  # in the sharded folder, with the model's shards
            if self.last_path in paths:  # every rank
                sharded = (self.sharded, self.sharded.save(self.dirpath, state["global_step"]))
        if not self.write:
            return
        if not self.async_write:
            return _write_all(state, paths, dropped, sharded)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = self._executor.submit(_write_all, snapshot(state), paths, dropped, sharded)

    def wait(self) -> None:
        """Block until the last submitted checkpoint is on disk; re-raises its error (e.g. a full disk)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
        if self.sharded is not None:
            self.sharded.wait()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown()
                self._executor = None

    def _beats(self, value: float, other: float) -> bool:
        return value > other if self.mode == "max" else value < other

    def state_dict(self) -> dict[str, Any]:
        return {"top_k": [list(item) for item in self.top_k]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.top_k = [(float(v), str(n)) for v, n in state.get("top_k", [])]
