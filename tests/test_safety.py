"""Safe loading, atomic writes under a full disk, the NaN guard (stop / skip) and secrets kept out of every file."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, cli_env, compose_config, forked_train, in_process, train
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from lab import checkpoint as ckpt
from lab.errors import UserError
from lab.redact import MASK, RedactingFilter, is_secret, redact, redact_override, scrub_hydra_dir


def plain_state(step: int = 0) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "epoch": 0, "global_step": step}


# ------------------------------------------------------------------ loading
def test_every_torch_load_in_the_project_uses_weights_only() -> None:
    sources = [*ROOT.glob("*.py"), *(ROOT / "src").rglob("*.py")]
    calls = [(p, m) for p in sources for m in re.finditer(r"torch\.load\(([^)]*)\)", p.read_text())]
    assert calls
    for path, match in calls:
        assert "weights_only=True" in match[1], f"{path}: {match[0]}"


def test_pickled_object_is_refused_with_the_file_named(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({**plain_state(), "payload": argparse.Namespace(run="rm -rf /")}, path)
    with pytest.raises(UserError, match=r"refused: .*argparse\.Namespace") as info:
        ckpt.load(path)
    assert str(path) in info.value.line()


@pytest.mark.parametrize("cut", [0, 10, 0.5, -1])
def test_truncated_checkpoint_error_names_the_file(cut: float, tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(plain_state(), good)
    data = good.read_bytes()
    size = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[:size])
    with pytest.raises(UserError, match="truncated or corrupt") as info:
        ckpt.load(bad)
    assert str(bad) in info.value.line()


# ------------------------------------------------------------------ writing
def test_disk_full_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk cannot be made here without privileges to mount a tiny filesystem: fsync is made to fail
    with ENOSPC, which is where a full disk shows up for a buffered write."""
    path = tmp_path / "last.pt"
    ckpt.write_atomic(ckpt.serialize(plain_state(1)), path)
    before = path.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="No space left on device") as info:
        ckpt.write_atomic(ckpt.serialize(plain_state(2)), path)
    assert str(path) in info.value.line() and "complete on disk, as they were: last.pt" in info.value.line()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert ckpt.load(path)["global_step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind


def test_background_writes_are_snapshots_in_order_and_their_errors_surface(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = ckpt.Checkpointer(str(tmp_path), "val/acc", "max", save_top_k=2)
    weights = torch.zeros(3)
    for epoch, value in enumerate([0.5, 0.7, 0.6], start=1):
        weights += 1  # changed right after each save: the written file must hold the value at save time
        checkpointer.save_epoch({"model": {"w": weights}, "epoch": epoch, "global_step": epoch}, epoch, value,
                                is_best=value == max([0.5, 0.7, 0.6][:epoch]))  # fmt: skip
        weights.mul_(100)
    checkpointer.wait()
    assert ckpt.load(tmp_path / "last.pt")["epoch"] == 3 and ckpt.load(tmp_path / "best.pt")["epoch"] == 2
    assert ckpt.load(tmp_path / "last.pt")["model"]["w"].tolist() == [10101.0] * 3  # ((1*100)+1)*100+1
    assert sorted(p.name for p in tmp_path.glob("epoch=*")) == ["epoch=002-val_acc=0.7000.pt",
                                                               "epoch=003-val_acc=0.6000.pt"]  # fmt: skip

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # a full disk (see above), now hit by the background thread
    checkpointer.save_step({"model": {"w": weights}, "epoch": 3, "global_step": 4})
    with pytest.raises(UserError, match="No space left on device"):
        checkpointer.close()
    monkeypatch.undo()
    assert ckpt.load(tmp_path / "last.pt")["global_step"] == 3  # the previous one is intact


def test_best_written_with_last_is_a_link_that_later_writes_leave_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = ckpt.Checkpointer(str(tmp_path), "val/acc", "max", async_write=False)
    checkpointer.save_epoch(plain_state(1), 1, 0.7, is_best=True)
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    assert last.samefile(best)  # one copy written and synced, two names
    checkpointer.save_epoch(plain_state(2), 2, 0.6, is_best=False)  # last.pt replaced by rename
    assert not last.samefile(best)
    assert ckpt.load(last)["global_step"] == 2 and ckpt.load(best)["global_step"] == 1

    def no_links(source: object, target: object) -> None:  # a filesystem without hard links (FAT, some NFS)
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    checkpointer.save_epoch(plain_state(3), 3, 0.8, is_best=True)
    assert not last.samefile(best) and last.read_bytes() == best.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]  # no temp file left behind


def test_top_k_names_shared_by_two_validations_of_one_epoch_stay_one_file(tmp_path: Path) -> None:
    # With trainer.val_check_interval an epoch validates more than once; equal values give equal names.
    checkpointer = ckpt.Checkpointer(str(tmp_path), "val/acc", "max", save_top_k=2, async_write=False)
    for step, value in enumerate([0.9, 0.9, 0.95, 0.97], start=1):
        checkpointer.save_epoch(plain_state(step), 3 if step <= 2 else step, value, is_best=False)
        assert all((tmp_path / name).is_file() for _, name in checkpointer.top_k), checkpointer.top_k
    kept = sorted(p.name for p in tmp_path.glob("epoch=*"))
    assert kept == ["epoch=003-val_acc=0.9500.pt", "epoch=004-val_acc=0.9700.pt"]
    assert sorted(name for _, name in checkpointer.top_k) == kept  # every entry has its file
    assert [ckpt.load(tmp_path / name)["global_step"] for name in kept] == [3, 4]


def test_stale_temp_files_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".last.pt.tmp-999999"
    stale.write_bytes(b"half a checkpoint")
    torch.save(plain_state(), tmp_path / "last.pt")
    ckpt.Checkpointer(str(tmp_path), "val/acc", "max")
    assert not stale.exists() and (tmp_path / "last.pt").is_file()


def test_resume_auto_finds_the_newest_last_pt(tmp_path: Path) -> None:
    assert ckpt.find_last(tmp_path, "task") is None
    for i, name in enumerate(["a", "b", "c"]):
        path = tmp_path / "task" / "runs" / name / "checkpoints" / "last.pt"
        path.parent.mkdir(parents=True)
        torch.save(plain_state(i), path)
        os.utime(path, ns=(10**18 + i * 10**9, 10**18 + (2 - abs(i - 1)) * 10**9))  # b is the newest
    (tmp_path / "other" / "runs" / "z" / "checkpoints").mkdir(parents=True)
    assert ckpt.find_last(tmp_path, "task") == tmp_path / "task" / "runs" / "b" / "checkpoints" / "last.pt"


# ------------------------------------------------------------------ NaN / Inf
POISON = "+callbacks.poison={{_target_:poison.NaNGradients,after_steps:{}}}"  # tests/poison.py
POISON_ENV = cli_env(PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}")


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    # NaN gradients from step 5 on (a test callback). Checkpoints every step, loss checked only every 50: the
    # weight check before each write is what keeps the diverged state (incl. BatchNorm statistics) off the disk.
    run_dir = tmp_path / "run"
    proc = train(run_dir, POISON.format(5), "checkpoint.every_n_steps=1", "trainer.log_every_n_steps=50",
                     "trainer.max_epochs=2", check=False, env=POISON_ENV)  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "NaN/Inf" in errors[0]
    state = ckpt.load(run_dir / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    step = int(re.search(r"at step (\d+)", errors[0])[1])
    assert state["global_step"] == step - 1  # the newest good state
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "diverged"


def test_a_diverged_job_is_a_failed_objective_and_the_sweep_goes_on(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = train(None, "hydra.mode=MULTIRUN", POISON.format(2), "callbacks.poison.after_steps=2,1000",
                     f"hydra.sweep.dir={sweep}", *TINY, "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "logger=none",
                     env=POISON_ENV)  # fmt: skip
    assert proc.returncode == 0
    first, second = (json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1))
    assert first["status"] == "diverged" and second["status"] == "success"


class ListLoader:
    """A plain iterable of fixed batches with `set_epoch` and `len` (the trainer adapts it: `as_loader`)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.fixed = batches

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.fixed)

    def __iter__(self):
        return iter(self.fixed)


def fit_on(batches: list, nan_policy: str, tmp_path: Path) -> nn.Module:
    from lab.optim import build_schedulers
    from lab.trainer import Trainer

    cfg = compose_config([f"trainer.nan_policy={nan_policy}", "trainer.max_epochs=1", "trainer.progress_bar=false",
                          "trainer.log_every_n_steps=1"], tmp_path)  # fmt: skip
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loaders = {"train": ListLoader(batches), "val": ListLoader(batches[:1])}
    checkpointer = ckpt.Checkpointer(str(tmp_path / "ckpt"), "val/acc", "max", save_last=False, save_top_k=0)
    trainer = Trainer(
        model,
        instantiate(cfg.task),
        loaders,
        optimizer,
        cfg.trainer,
        schedulers=build_schedulers(cfg.scheduler, optimizer, 1),
        checkpointer=checkpointer,
    )
    trainer.fit()
    return model


def test_nan_policy_skip_skips_exactly_the_bad_steps(tmp_path: Path) -> None:
    from lab.trainer import TrainingDiverged

    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)
    ]
    poisoned = [*batches[:2], (torch.full((8, 1, 8, 8), float("inf")), batches[0][1]), *batches[2:]]
    skipped = fit_on(poisoned, "skip", tmp_path / "a")
    clean = fit_on(batches, "skip", tmp_path / "b")
    for a, b in zip(skipped.parameters(), clean.parameters(), strict=True):
        assert torch.equal(a, b)  # the poisoned step changed nothing, not even Adam's moments or step count
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        fit_on(poisoned, "stop", tmp_path / "c")


# ------------------------------------------------------------------ secrets
def test_redaction_helpers(tmp_path: Path) -> None:
    config = {"logger": {"wandb": {"api_key": "k-123456", "project": "p"}}, "x": [{"password": "pw-123456"}],
              "token_budget_none": None}  # fmt: skip
    assert redact(config) == {"logger": {"wandb": {"api_key": MASK, "project": "p"}}, "x": [{"password": MASK}],
                              "token_budget_none": None}  # fmt: skip
    assert redact_override("+logger.wandb.api_key=k-123456") == f"+logger.wandb.api_key={MASK}"
    assert redact_override("optimizer.lr=0.1") == "optimizer.lr=0.1"
    # The broad name pattern: key, token, secret, passw, credential, auth anywhere in the name.
    names = ("hf_token", "WANDB_API_KEY", "client_secret", "db.password", "apikey", "wandb_key", "AUTH")
    assert [is_secret(k) for k in names] == [True] * 7
    assert [is_secret(k) for k in ("optimizer.lr", "model.width", "db_dsn")] == [False] * 3
    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    (hydra_dir / "config.yaml").write_text("logger:\n  wandb:\n    api_key: k-123456\n    project: p\n")
    (hydra_dir / "overrides.yaml").write_text("- +logger.wandb.api_key=k-123456\n- optimizer.lr=0.1\n")
    scrub_hydra_dir(tmp_path, config)
    assert (
        "k-123456" not in (hydra_dir / "config.yaml").read_text() + (hydra_dir / "overrides.yaml").read_text()
    )
    assert "project: p" in (hydra_dir / "config.yaml").read_text()
    record = logging.LogRecord("lab", logging.INFO, __file__, 1, "key is %s", ("k-123456",), None)
    RedactingFilter({"k-123456"}).filter(record)
    assert record.getMessage() == f"key is {MASK}"


def test_secrets_from_dotenv_never_reach_a_file_or_the_console(tmp_path: Path) -> None:
    secret, other = "sk-live-0123456789abcdef", "tok-9876543210"
    (tmp_path / ".env").write_text(f"LAB_TEST_API_KEY={secret}\n")
    run_dir = tmp_path / "run"
    # The key reaches the config only through `.env` (oc.env fails without it), so the run succeeding proves
    # `.env` was read; a second secret comes straight from the command line.
    proc = train(run_dir, *TINY, "logger=csv", "print_config=true", "+dataset.api_key=${oc.env:LAB_TEST_API_KEY}",
                     f"+dataset.hub_token={other}", cwd=tmp_path, env=cli_env())  # fmt: skip
    assert "api_key" in proc.stdout and MASK in proc.stdout  # the printed config shows the key, masked
    for text in (proc.stdout, proc.stderr):
        assert secret not in text and other not in text
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "last.pt" for p in files) and any(p.name == "config.yaml" for p in files)
    for path in files:
        data = path.read_bytes()
        assert secret.encode() not in data and other.encode() not in data, path
    saved = ckpt.load(run_dir / "checkpoints" / "last.pt")["config"]["dataset"]
    assert saved["api_key"] == MASK and saved["hub_token"] == MASK


# ------------------------------------------------------------------ signals (in-process, exact moments)
class SignallingLoader(ListLoader):
    """Sends `signals` to this process when batch `at` is drawn: a signal at an exact point of the loop."""

    def __init__(self, batches: list, at: int, signals: list[int]) -> None:
        super().__init__(batches)
        self.at, self.signals = at, signals

    def __iter__(self):
        for index, batch in enumerate(self.fixed):
            if index == self.at:
                for signum in self.signals:
                    os.kill(os.getpid(), signum)
            yield batch


def interrupted_trainer(tmp_path: Path, train_loader: ListLoader, val_loader: ListLoader, *overrides: str):
    from lab.optim import build_schedulers
    from lab.trainer import Trainer

    cfg = compose_config(["trainer.max_epochs=3", "trainer.progress_bar=false", *overrides], tmp_path)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    checkpointer = ckpt.Checkpointer(str(tmp_path / "ckpt"), "val/acc", "max")
    return Trainer(
        model,
        instantiate(cfg.task),
        {"train": train_loader, "val": val_loader},
        optimizer,
        cfg.trainer,
        schedulers=build_schedulers(cfg.scheduler, optimizer, 1),
        checkpointer=checkpointer,
    )


def batches(n: int) -> list:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_signal_mid_epoch_finishes_the_step_and_saves(signame: str, tmp_path: Path) -> None:
    from lab.trainer import TrainingInterrupted

    signum = getattr(signal, signame)
    trainer = interrupted_trainer(tmp_path, SignallingLoader(batches(5), at=2, signals=[signum]),
                                  ListLoader(batches(1)), "trainer.stop_signals=[SIGINT,SIGTERM,SIGUSR1]")  # fmt: skip
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.signum == signum
    state = ckpt.load(tmp_path / "ckpt" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (
        0,
        3,
        3,
    )  # batch 3 was finished
    assert state["train_metrics"]["epoch"]["count"] == 12
    assert signal.getsignal(signum) is not None and trainer.stop_signal == signum


def test_signal_during_validation_completes_the_epoch_then_saves(tmp_path: Path) -> None:
    from lab.trainer import TrainingInterrupted

    trainer = interrupted_trainer(tmp_path, ListLoader(batches(3)),
                                  SignallingLoader(batches(2), at=0, signals=[signal.SIGTERM]))  # fmt: skip
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    state = ckpt.load(tmp_path / "ckpt" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (1, 0, 3)
    assert state["monitor"]["best"] is not None and (tmp_path / "ckpt" / "best.pt").is_file()


def test_a_second_signal_quits_at_once_without_a_traceback(tmp_path: Path) -> None:
    """A real process (forked): two Ctrl-C (SIGINT; SIGTERM takes the same path) in a row, the second while the first is still stopping the run (the step, last.pt,
    closing the loggers): the process ends at once with one line, no traceback, 128 + the signal number."""
    signame, signum = "SIGINT", signal.SIGINT
    run_dir = tmp_path / "run"
    proc = forked_train(run_dir, "logger=many", "logger.wandb.mode=offline", "trainer.max_epochs=200",
                        "checkpoint.every_n_steps=2")  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signum)
    # The second one while the first is still being handled (its warning logged, the run not yet ended): sent
    # blindly after a fixed delay it could also arrive after the interpreter reset its handlers at exit.
    log_file = run_dir / "train.log"
    while "received: stopping after this step" not in log_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert (
        stderr.strip().splitlines()[-1]
        == f"{signame} again: quitting at once; the checkpoints on disk are complete"
    )
    ckpt.load(run_dir / "checkpoints" / "last.pt")  # complete


def test_secret_values_never_reach_a_sweep_file_or_the_console(tmp_path: Path) -> None:
    """Secrets by value: an override whose name only contains `key`, a `token`, an environment variable named
    `*auth*` that reaches the config through `${oc.env:...}` under a plain name, and a name listed in
    LAB_SECRETS; every byte of the sweep (multirun.yaml, each job's .hydra/, run_info.json, checkpoints,
    TensorBoard, CSV, W&B offline files) and the console are searched for each value."""
    secrets = {"wandb_key": "wk-0123456789ab", "hf_token": "hf-abcdef012345", "env": "env-auth-55667788",
               "listed": "dsn-postgres-998877"}  # fmt: skip
    env = cli_env(MY_SERVICE_AUTH=secrets["env"], LAB_SECRETS="db_dsn")
    sweep_dir = tmp_path / "sweep"
    args = ["-m", f"hydra.sweep.dir={sweep_dir}", *TINY, "trainer.max_epochs=1", "logger=many",
            "print_config=true", "trainer.progress_bar=false", f"+wandb_key={secrets['wandb_key']}",
            f"+dataset.hf_token={secrets['hf_token']}", "+dataset.endpoint=${oc.env:MY_SERVICE_AUTH}",
            f"+db_dsn={secrets['listed']}", "optimizer.lr=1e-3,1e-2"]  # fmt: skip
    proc = in_process("train.py", args, check=True, env=env)
    assert "#0 : " in proc.stdout + proc.stderr and MASK in proc.stdout + proc.stderr
    files = [p for p in sweep_dir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"multirun.yaml", "overrides.yaml", "run_info.json", "last.pt", "metrics.csv"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert any(n.endswith(".wandb") for n in names)
    for value in secrets.values():
        assert value not in proc.stdout and value not in proc.stderr
        for path in files:
            assert value.encode() not in path.read_bytes(), path
    job = OmegaConf.load(sweep_dir / "0" / ".hydra" / "overrides.yaml")
    assert f"+wandb_key={MASK}" in job and "optimizer.lr=0.001" in job


def test_a_checkpoint_that_cannot_be_written_stops_the_run_at_once_and_says_what_is_on_disk(
    tmp_path: Path,
) -> None:
    """A real process (forked) whose files may not grow past 400 kB (RLIMIT_FSIZE: a real write failure, EFBIG,
    without privileges to mount a tiny filesystem): the first checkpoint (~0.8 MB, written in the background at step
    5) fails, the run stops before the next one is due (step 10) with one line saying none is on disk yet."""
    run_dir = tmp_path / "run"
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    # The child inherits the limit and the ignored SIGXFSZ (the write fails with EFBIG instead of killing the
    # process); this process takes its own back at once.
    resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, limits[1]))
    on_xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        forked = forked_train(run_dir, "logger=csv", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=5",
                              "trainer.limit_train_batches=16")  # fmt: skip
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, on_xfsz)
    stdout, stderr = forked.communicate(timeout=300)
    proc = subprocess.CompletedProcess(forked.args, forked.returncode, stdout, stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert proc.stderr.strip().splitlines() == [
        f"error: could not write the checkpoint (File too large); no checkpoint is on disk in {checkpoints} yet "
        f"({checkpoints / 'last.pt'}): free disk space or point hydra.run.dir / checkpoint.dirpath at a writable "
        "place, then resume from last.pt"
    ]
    assert not list(checkpoints.iterdir())  # no temp file left either
    steps = [int(line.split(",")[0]) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert 5 <= max(steps) < 10
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"
