"""Process-level set-up: device, seeds, determinism, RNG state capture and the run's provenance record."""

from __future__ import annotations

import hashlib
import os
import platform
import random
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lab.errors import UserError
from lab.redact import redact_override

KEY_PACKAGES = (
    "torch",
    "torchvision",
    "hydra-core",
    "omegaconf",
    "numpy",
    "tensorboard",
    "torchinfo",
    "wandb",
)


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is absent is a user error."""
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"unknown device {name!r}", "trainer.device", "use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "CUDA is not available on this machine", "trainer.device", "use trainer.device=auto or cpu"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"no GPU {device.index} (found {torch.cuda.device_count()})", "trainer.device", "")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(
            "MPS is not available on this machine", "trainer.device", "use trainer.device=auto or cpu"
        )
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(
            f"unsupported device {name!r}", "trainer.device", "use auto, cpu, cuda, cuda:N or mps"
        )
    return device


def check_writable(directory: str | Path, key: str) -> None:
    """Create `directory` and a probe file in it; any OSError becomes one clear line."""
    directory = Path(directory)
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"output directory is not writable: {directory} ({e.strerror or type(e).__name__})",
            key,
            "choose a writable place with hydra.run.dir=... or paths.log_dir=...",
        ) from None


def check_launch_env(env: dict[str, str] | None = None) -> tuple[int, int]:
    """`(rank, world_size)` from torchrun's variables; inconsistent ones are a user error, not a hang."""
    env = os.environ if env is None else env
    values = {}
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        text = env.get(name, default)
        try:
            values[name] = int(text)
        except ValueError:
            raise UserError(
                f"must be an integer, got {text!r}", name, "launch with torchrun --nproc_per_node=N"
            ) from None
    world_size, rank = values["WORLD_SIZE"], values["RANK"]
    if world_size < 1:
        raise UserError(
            f"world size must be >= 1, got {world_size}",
            "WORLD_SIZE",
            "use torchrun --nproc_per_node=N, N >= 1",
        )
    if not 0 <= rank < world_size or values["LOCAL_RANK"] < 0:
        raise UserError(f"rank {rank} does not fit world size {world_size}", "RANK/WORLD_SIZE",
                        "let torchrun set RANK and WORLD_SIZE")  # fmt: skip
    return rank, world_size


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+; no effect elsewhere
        torch.backends.cudnn.allow_tf32 = True


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain Python values, so checkpoints load with `weights_only=True`."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> tuple[str | None, str | None]:
    """The commit checked out and the uncommitted changes to tracked files (`git diff HEAD`); None outside git."""
    return _git("rev-parse", "HEAD"), _git("diff", "HEAD")


def sha256(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def run_info() -> dict[str, Any]:
    """What it takes to reproduce a run: code version, packages, machine, command line."""
    versions = {}
    for package in KEY_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    status = _git("status", "--porcelain")
    commit, diff = code_version()
    return {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "git_diff_sha256": sha256(diff),  # uncommitted changes to tracked files, as a sweep's code/diff.patch
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "command": [sys.executable, *map(redact_override, sys.argv)],  # secret values masked
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def quit_now(signum: int, frame: Any = None) -> None:
    """A second stop signal: end the process at once, with one line and no traceback (no cleanup runs: the
    checkpoints on disk are complete, a write still in flight is dropped and its temp file removed next time)."""
    import signal

    name = signal.Signals(signum).name
    os.write(2, f"{name} again: quitting at once; the checkpoints on disk are complete\n".encode())
    os._exit(128 + signum)
