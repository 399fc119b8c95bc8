"""Shared test helpers: compose configs like Hydra does, run `train.py` in this process (fast) or as a real CLI
process (one test per user-facing command), and keep global state from leaking between in-process runs."""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import random
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# Before anything imports the standard library's distutils (some dependencies do): setuptools, which torch's
# inductor imports for trainer.compile, refuses to load after that in the same process.
import setuptools  # noqa: F401
import torch
import torch._dynamo  # imported by the first optimizer of a process (2 CPU s here): once, before any fork
import torch.utils.tensorboard  # imported once here: see below
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

# What every run imports (train.py's modules, TensorBoard's writer) is imported once here: the processes a test
# forks (`Forked`, `forked_ranks`) inherit it instead of each importing it again.
import lab.hydra_callbacks
import lab.resolvers  # `import lab` registers the config resolvers
import lab.train
import lab.trainer

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Small and quick, but still real training: two epochs of a few batches.
TINY = ["trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.log_every_n_steps=2"]
QUIET = ["trainer.progress_bar=false", "print_config=false"]
# A few hundred generated images instead of digits' 1,797, for runs whose backbone sees every image (feature
# extraction, an unfrozen network): that pass is most of such a run's work.
FEW_IMAGES = ["dataset=synthetic", "dataset.source.num_samples=256", "dataset.batch_size=32"]
# One intra-op thread, here and in every process a test starts: the test models are tiny, and two threads
# spin-waiting on a busy 2-core machine make a step 10-40x slower than one.
THREADS = "1"
torch.set_num_threads(int(THREADS))
# Frozen-backbone features go to a folder of this test process, not to the repository's outputs/ (where a cache
# left by an earlier test run would hide work): shared by this process's runs, as a user's runs share it. A test
# about the cache gives its own `paths.feature_cache`, which comes later on the command line and wins.
FEATURE_CACHE = Path(tempfile.mkdtemp(prefix="lab-test-features-"))


# The files that take longest start first: with `--dist loadfile` (pyproject.toml) a file runs on one worker, and a
# long file started last would leave the other worker idle at the end. The rest keep their order.
LONGEST_FIRST = ("test_sweep.py", "test_ddp.py", "test_kill_resume.py", "test_bad_inputs.py", "test_speed.py",
                 "test_wandb.py", "test_docs.py", "test_fsdp.py", "test_export.py", "test_predict.py")  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


def compose_config(overrides: list[str] = (), output_dir: Path | str = "/tmp/lab-test") -> DictConfig:
    """The config `python train.py <overrides>` would run with (paths.output_dir pointed at a temp dir)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "train",
            overrides=[f"paths.output_dir={output_dir}", f"paths.feature_cache={FEATURE_CACHE}", *overrides],
        )


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    env.update(PYTHONPATH=str(ROOT / "src"), WANDB_MODE="offline", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    env.update(OMP_NUM_THREADS=THREADS)
    env.update(extra)
    return env


def train_args(run_dir: Path | None, overrides: tuple[str, ...]) -> list[str]:
    run = [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
    return [*QUIET, f"paths.feature_cache={FEATURE_CACHE}", *run, *overrides]


def run_train(
    run_dir: Path | None,
    *overrides: str,
    check: bool = True,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """`python train.py hydra.run.dir=<run_dir> <overrides>` in a real process. A process costs 3 s of imports:
    use `train()` unless the test is about the process itself (signals, imports, the command line)."""
    return run_cli("train.py", train_args(run_dir, overrides), check=check, timeout=timeout, env=env, cwd=cwd)


def train(
    run_dir: Path | None,
    *overrides: str,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """`run_train` without the process: the same command line, run by `in_process`."""
    return in_process("train.py", train_args(run_dir, overrides), check=check, env=env, cwd=cwd)


def run_cli(
    script: str,
    args: list[str],
    check: bool = False,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """`python <script> <args>` in a subprocess, stdin closed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd or ROOT,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return checked(proc, check)


def in_process(
    script: str,
    args: list[str],
    check: bool = False,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """`python <script> <args>` run in this process, as `__main__` (so train.py's `.env` and torchrun steps run,
    then `@hydra.main` parses `sys.argv`), from the environment, working directory and output streams a fresh
    process would have; the exit code is the `SystemExit` code. An uncaught exception is reported as on the
    command line (its traceback on stderr, exit 1). Saves the 3 s of imports a process costs."""
    with isolated_process(env or cli_env(), cwd or ROOT) as out:
        code = run_as_main(ROOT / script, args)
    proc = subprocess.CompletedProcess([sys.executable, script, *args], code, out.stdout, out.stderr)
    return checked(proc, check)


def run_as_main(path: Path, args: list[str]) -> int:
    """`path` run as `__main__` with `sys.argv` = `[path, *args]`; the exit code a process would end with: the
    `SystemExit` code, or for an uncaught exception its traceback on stderr and 1, as the interpreter reports it."""
    saved_argv, sys.argv = sys.argv, [str(path), *args]
    try:
        runpy.run_path(str(path), run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        sys.argv = saved_argv


class Forked:
    """`python <script> <args>` as a real process that starts from this one's imports: a fork of the test process
    runs the script as `__main__`. Its own pid, signals, exit code, and files and locks the OS releases when it is
    killed, as for `subprocess.Popen`, without the 5-8 CPU seconds of imports a fresh interpreter costs. For tests
    about a process's fate (kill -9, signals, locks); tests about start-up or imports need `run_cli`."""

    def __init__(
        self, script: str, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ):
        self.args = [sys.executable, script, *args]
        self.returncode: int | None = None
        # The child's stdout and stderr, read back by `communicate` (open as long as the process runs).
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115
        self._output: tuple[str, str] | None = None
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self.pid = os.fork()
        if self.pid == 0:
            _forked_main(ROOT / script, args, env or cli_env(), cwd or ROOT, self._out, self._err)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        if self._output is None:
            self._output = (self._read(self._out), self._read(self._err))
        return self._output

    @staticmethod
    def _read(file) -> str:
        with file:
            file.seek(0)
            return file.read().decode(errors="replace")


def _forked_main(path: Path, args: list[str], env: dict[str, str], cwd: Path, out, err) -> None:
    """The child of `Forked`: what a fresh `python <path> <args>` would start from, then the script, then the
    interpreter's own exit steps (non-daemon threads joined, atexit handlers run). Never returns."""
    code = 1
    try:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        atexit._clear()  # the test process's exit handlers are not this process's
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, signal.SIG_DFL)
        logging.getLogger().handlers.clear()  # pytest's capture handlers
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        lab.resolvers._RUN_ID = lab.resolvers._RUN_TIME = None
        code = run_as_main(path, args)
    except BaseException:  # e.g. KeyboardInterrupt, which run_as_main leaves to the interpreter
        traceback.print_exc()
    finally:
        try:
            threading._shutdown()
            atexit._run_exitfuncs()  # those registered since the fork
            logging.shutdown()  # registered at exit by `logging` itself in a fresh interpreter: flushes the log files
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def forked_train(run_dir: Path | None, *overrides: str, env: dict[str, str] | None = None) -> Forked:
    """`python train.py hydra.run.dir=<run_dir> <overrides>` started as a `Forked` process."""
    return Forked("train.py", train_args(run_dir, overrides), env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forked_ranks(
    script: str,
    args: list[str],
    nproc: int = 2,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
    grace: float = 10,
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=<nproc> <script> <args>` without torchrun: `nproc` `Forked` processes,
    each given the environment torchrun's agent gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and a
    free MASTER_PORT, TORCHELASTIC_*, ...). Saves the `nproc + 1` fresh interpreters (3-5 CPU s each) of a job.

    Returns torchrun's exit code (0, or the code of the first rank to fail), and the ranks' stdout and stderr one
    after the other in rank order, each under a `[rank N]` line; `.ranks` holds each rank's own `CompletedProcess`.
    When a rank fails, the others get `grace` seconds to end on their own (most then fail on a collective whose peer
    is gone, with their own error), and are killed after it, as torchrun's agent stops its group; past `timeout`
    every rank is killed and the outputs reported.

    Not covered, and kept on the real torchrun by the tests about them: torchrun's agent and command line, i.e. its
    rendezvous (several nodes), restarts (TORCHELASTIC_RESTART_COUNT stays 0) and the store it keeps across them
    (TORCHELASTIC_USE_AGENT_STORE=False: the group's store is rank 0's, as with `init_process_group("env://")`),
    its own error report and exit code (1 for a failed worker); nor a fresh interpreter's start-up (imports,
    sitecustomize)."""
    # A group of this process would live on in every fork; a test process must never hold one.
    assert not torch.distributed.is_initialized()
    launch = {
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "ROLE_WORLD_SIZE": str(nproc),
        "GROUP_RANK": "0",
        "GROUP_WORLD_SIZE": "1",
        "ROLE_NAME": "default",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "TORCHELASTIC_RUN_ID": str(uuid.uuid4()),
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }
    base = {"OMP_NUM_THREADS": "1", **(env or cli_env())}  # torchrun's default for more than one process
    procs = [
        Forked(
            script,
            args,
            env={**base, **launch, "RANK": str(r), "LOCAL_RANK": str(r), "ROLE_RANK": str(r)},
            cwd=cwd,
        )
        for r in range(nproc)
    ]
    deadline = stop = time.monotonic() + timeout
    failed: list[Forked] = []  # in the order they failed
    timed_out = False
    while None in [proc.poll() for proc in procs]:  # every rank polled, not the first running one alone
        failed += [proc for proc in procs if proc.returncode not in (None, 0) and proc not in failed]
        if failed:
            stop = min(stop, time.monotonic() + grace)
        if time.monotonic() > stop:
            timed_out = time.monotonic() > deadline
            for proc in procs:
                proc.kill()
                proc.wait()
        time.sleep(0.02)
    failed += [proc for proc in procs if proc.returncode != 0 and proc not in failed]
    outputs = [proc.communicate() for proc in procs]
    ranks = [
        subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        for proc, (out, err) in zip(procs, outputs, strict=True)
    ]
    report = "".join(
        f"[rank {r}] exit {rank.returncode}\nstdout:\n{rank.stdout[-3000:]}\nstderr:\n{rank.stderr[-5000:]}\n"
        for r, rank in enumerate(ranks)
    )
    if timed_out:
        raise AssertionError(f"{nproc} forked ranks of {script} still ran after {timeout} s\n{report}")
    proc = subprocess.CompletedProcess(
        ["torchrun", f"--nproc_per_node={nproc}", script, *args],
        failed[0].returncode if failed else 0,
        "".join(f"[rank {r}]\n{rank.stdout}" for r, rank in enumerate(ranks)),
        "".join(f"[rank {r}]\n{rank.stderr}" for r, rank in enumerate(ranks)),
    )
    proc.ranks = ranks
    if check and proc.returncode != 0:
        raise AssertionError(report)
    return proc


def checked(proc: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc


class Captured:
    stdout = stderr = ""


@contextlib.contextmanager
def isolated_process(env: dict[str, str], cwd: Path) -> Iterator[Captured]:
    """What a fresh process would start from, undone afterwards: environment, cwd, stdout/stderr, logging,
    signal handlers, RNGs, determinism flags, torch threads, the per-process run id/time and Hydra's singletons."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_loggers = {
        name: (lg.level, lg.handlers[:], lg.propagate, lg.disabled)
        for name, lg in logging.Logger.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    signals = {
        s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    }
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_num_threads(),
    )
    lab.resolvers._RUN_ID = lab.resolvers._RUN_TIME = None
    captured, stdout, stderr = Captured(), io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            yield captured
    finally:
        if "wandb" in sys.modules:  # as at process exit: W&B's service finishes writing its runs and stops
            sys.modules["wandb"].teardown()
        for handler in root.handlers:  # Hydra's console and train.log handlers: flush and close the files
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:], root.level = saved_handlers, saved_level
        for name, (level, handlers, propagate, disabled) in saved_loggers.items():
            lg = logging.getLogger(name)
            lg.level, lg.handlers[:], lg.propagate, lg.disabled = level, handlers, propagate, disabled
        logging.Logger.manager._clear_cache()  # what setLevel does, once: per logger it would cost O(loggers)
        captured.stdout, captured.stderr = stdout.getvalue(), stderr.getvalue()
        for signum, handler in signals.items():
            signal.signal(signum, handler)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2], flags[3]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[4], flags[5]
        torch.set_num_threads(flags[6])
        lab.resolvers._RUN_ID = lab.resolvers._RUN_TIME = None
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None


@pytest.fixture
def tmp_outputs(tmp_path: Path) -> Path:
    return tmp_path / "outputs"
