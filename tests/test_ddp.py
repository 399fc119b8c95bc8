"""DistributedDataParallel on the CPU (gloo): one run dir, rank 0 writes, the model equals a single process with the
same global batch, two nodes equal one, a restarted group resumes exactly, torchrun's workers exit cleanly. Tests of lab
under two ranks run forked ranks (`forked_ddp`, the reference job included), which save torchrun's interpreters; the
real `torchrun` runs where torchrun itself is tested: two nodes (its rendezvous, and a real interpreter exit in each
worker) and an elastic restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_env, forked_ranks, free_port, train

# No dropout (its random masks differ between one process and two) and no BatchNorm (its statistics are per
# process on the CPU): with these, two processes of batch 16 must take exactly the step of one of batch 32.
MODEL = ["model=mlp", "model.dropout=0", "logger=csv", "trainer.progress_bar=false", "print_config=false"]


# Python imports `sitecustomize` from PYTHONPATH at start-up: in each rank this one records, at exit (after
# train.py has returned, just before the interpreter tears down), which threads are still running.
EXIT_PROBE = """
import atexit, os

def record():
    tasks = os.listdir("/proc/self/task")
    names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks)
    with open(os.path.join(os.environ["EXIT_PROBE_DIR"], "threads-" + os.environ["RANK"]), "w") as f:
        f.write("\\n".join(names))

if "RANK" in os.environ:
    atexit.register(record)
"""


def torchrun(log_dir: Path, *overrides: str, check: bool = True, probe: Path | None = None,
             sitecustomize: str = EXIT_PROBE, launch: tuple[str, ...] = ()):  # fmt: skip
    """`torchrun --standalone --nproc_per_node=2 <launch> train.py trainer=ddp ...` with the default run dir; with
    `probe`, each rank runs `sitecustomize` at start-up (by default it writes the names of its threads left at exit
    to `probe/threads-<rank>`)."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *launch,
            str(ROOT / "train.py"), *ddp_args(log_dir, overrides)]  # fmt: skip
    env = cli_env() if probe is None else probe_env(probe, sitecustomize)
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0 or not check, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def probe_env(probe: Path, sitecustomize: str = EXIT_PROBE) -> dict[str, str]:
    """`cli_env()` with `probe/sitecustomize.py` (written here) run by each process at start-up; EXIT_PROBE_DIR=probe."""
    probe.mkdir(parents=True, exist_ok=True)
    (probe / "sitecustomize.py").write_text(sitecustomize)
    env = cli_env()
    env.update(PYTHONPATH=f"{probe}{os.pathsep}{env['PYTHONPATH']}", EXIT_PROBE_DIR=str(probe))
    return env


def ddp_args(log_dir: Path, overrides: tuple[str, ...]) -> list[str]:
    return ["trainer=ddp", f"paths.log_dir={log_dir}", *MODEL, *overrides]


def forked_ddp(log_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun(log_dir, *overrides)` as two ranks forked from this process (`conftest.forked_ranks`): for tests of
    lab under two ranks, not of torchrun; the ranks' outputs one after the other."""
    return forked_ranks("train.py", ddp_args(log_dir, overrides), check=check)


def only_run_dir(log_dir: Path) -> Path:
    runs = sorted((log_dir / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # every rank used rank 0's run dir (hydra issue 2070)
    return runs[0]


# Deterministic, 6 steps of 2 x 8 samples, last.pt every 2 steps (written in the loop), EMA on: each rank averages
# its own (identical) weights, which must equal one process's average. One uninterrupted job with these settings
# (forked ranks: lab's code path under torchrun) is the reference of every test here: one process with the global
# batch, two nodes, an elastic restart, which must match it bit for bit.
JOB = ["trainer.deterministic=true", "trainer.max_epochs=1", "trainer.limit_train_batches=6",
       "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=2", "checkpoint.async_write=false",
       "callbacks=[default,ema]", "callbacks.ema.warmup=false", "callbacks.ema.decay=0.5"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run dir of the job on one node with two (forked) processes (batch 8 each)."""
    log_dir = tmp_path_factory.mktemp("ddp")
    forked_ddp(log_dir, *JOB, "dataset.batch_size=8")
    return only_run_dir(log_dir)


@pytest.mark.slow
def test_two_process_ddp_steps_equal_one_process_with_the_global_batch(uninterrupted: Path, tmp_path: Path):
    run_dir = uninterrupted
    train(tmp_path / "single", *MODEL, *JOB, "dataset.batch_size=16")

    ddp = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    single = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=True)
    assert ddp["global_step"] == 6
    assert set(ddp["model"]) == set(single["model"])  # the unwrapped model's keys (no "module." prefix)
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, atol=1e-6, rtol=1e-5)
    ema, single_ema = ddp["callbacks"]["ema"], single["callbacks"]["ema"]
    assert ema["updates"] == single_ema["updates"] == 6
    for key, value in single_ema["weights"].items():
        torch.testing.assert_close(ema["weights"][key], value, atol=1e-6, rtol=1e-5)
    # Metrics under DDP: each rank evaluates its shard, torchmetrics and the loss sum are reduced over both.
    ddp_metrics = json.loads((run_dir / "metrics.json").read_text())
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    for key in ("val/loss", "val/acc", "test/loss", "test/acc", "test/acc_top5"):
        assert ddp_metrics[key] == pytest.approx(single_metrics[key], rel=1e-4), key  # sums in another order

    # The training loss of that step is all-reduced over both halves of the batch: the one-process value.
    ddp_loss = (run_dir / "metrics.csv").read_text().splitlines()
    single_loss = (tmp_path / "single" / "metrics.csv").read_text().splitlines()
    header = ddp_loss[0].split(",")
    column = header.index("train/loss")
    assert float(ddp_loss[1].split(",")[column]) == pytest.approx(
        float(single_loss[1].split(",")[column]), abs=1e-5
    )
    # Only rank 0 logs: each epoch line once in train.log.
    log = (run_dir / "train.log").read_text()
    assert log.count("epoch 1/1") == 1
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "success"


def test_trainer_ddp_without_torchrun_says_how_to_start_it(tmp_path):
    proc = train(tmp_path, "trainer=ddp", "debug=fast", check=False)
    assert proc.returncode == 2
    assert "torchrun --nproc_per_node=N train.py trainer=ddp" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_unfreezing_during_training_is_refused_under_ddp(tmp_path):
    proc = forked_ddp(tmp_path / "ddp", "model=mobilenet_v3_small_frozen", "model.weights=null", "dataset.image_size=32",
                      "model.unfreeze_at_epoch=1", check=False)  # fmt: skip
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert ours and all("(model.unfreeze_at_epoch)" in line for line in ours), proc.stderr[-3000:]
    assert not list((tmp_path / "ddp").rglob("*.pt"))  # refused before training


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The job (`uninterrupted`'s) as two torchrun launches of one process each, as on two machines: c10d rendezvous
    on localhost. Each "node" runs in its own folder (`node0`, `node1`) with the default relative `outputs/`, as if
    each had its own disk, so that a file written by the wrong process shows up on the wrong node. Each worker, a
    real interpreter started by torchrun, runs EXIT_PROBE: `exit_probe/threads-<global rank>`."""
    tmp_path = tmp_path_factory.mktemp("two_nodes")
    port, nodes = free_port(), [tmp_path / "node0", tmp_path / "node1"]
    env = probe_env(tmp_path / "exit_probe")
    procs = []
    for node_rank, cwd in enumerate(nodes):
        cwd.mkdir()
        args = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
                "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=job",
                str(ROOT / "train.py"), "trainer=ddp", *MODEL, *JOB, "dataset.batch_size=8"]  # fmt: skip
        procs.append(subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-5000:]
    return tmp_path


@pytest.mark.slow
def test_torchrun_workers_exit_with_no_gloo_thread_left(two_nodes: Path) -> None:
    # A gloo process group still alive at interpreter exit aborts a finished rank at random ("terminate called
    # without an active exception", exit -6, and torchrun reports the job failed): none may be left by then, in
    # any rank (forked ranks end with os._exit, so only a real worker's exit shows it).
    for rank in ("0", "1"):
        threads = (two_nodes / "exit_probe" / f"threads-{rank}").read_text().split()
        assert threads and not [name for name in threads if "gloo" in name], (rank, threads)


@pytest.mark.slow
def test_two_nodes_run_one_job_that_global_rank_0_alone_writes(uninterrupted: Path, two_nodes: Path):
    nodes = [two_nodes / "node0", two_nodes / "node1"]
    # The rendezvous, not --node_rank, decides which node holds global rank 0: that node alone has files.
    written = [files_under(node) for node in nodes]
    assert sorted(map(bool, written)) == [False, True], written
    run_dir = only_run_dir(nodes[0 if written[0] else 1] / "outputs")
    other = nodes[1 if written[0] else 0] / "outputs" / "train" / "runs"
    assert [p.name for p in other.iterdir()] == [run_dir.name]  # the agreed run dir (created empty by Hydra)
    assert {".hydra", "train.log", "metrics.json"} <= {p.name for p in run_dir.iterdir()}
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "success"

    # The same job on one node with two processes: the same tensors, bit for bit.
    two = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    one = torch.load(uninterrupted / "checkpoints" / "last.pt", weights_only=True)
    assert two["global_step"] == one["global_step"] == 6
    for part in ("model", "callbacks"):
        torch.testing.assert_close(two[part], one[part], rtol=0, atol=0)


# Rank 1 of the first group (torchrun's attempt 0) dies right after its optimizer step KILL_AT_STEP, as a crashed
# worker would: torchrun stops rank 0 and starts both again.
KILL_RANK_1 = """
import os

if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = [0]

    def die(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == int(os.environ["KILL_AT_STEP"]):
            os._exit(1)

    register_optimizer_step_post_hook(die)
"""


@pytest.mark.slow
def test_a_group_torchrun_restarts_resumes_its_run_and_ends_as_an_uninterrupted_one(
    uninterrupted: Path, tmp_path: Path
):
    """Also the test of resuming under DDP: every rank loads last.pt and continues bit for bit."""
    restarted = tmp_path / "restarted"
    env_before = os.environ.get("KILL_AT_STEP")
    os.environ["KILL_AT_STEP"] = "5"  # read by the ranks (cli_env copies the environment)
    try:
        torchrun(restarted, *JOB, "dataset.batch_size=8", probe=tmp_path / "kill", sitecustomize=KILL_RANK_1,
                 launch=("--max-restarts=1",))  # fmt: skip
    finally:
        os.environ.pop("KILL_AT_STEP") if env_before is None else os.environ.update(KILL_AT_STEP=env_before)
    run_dir = only_run_dir(restarted)  # the restarted group found the same run dir
    log = (run_dir / "train.log").read_text()
    assert f"torchrun restarted the group: resuming from the run's own {run_dir}/checkpoints/last.pt" in log
    assert "at epoch 0, step 4" in log  # step 5, done before rank 1 died, was lost and done again

    resumed = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    reference = torch.load(uninterrupted / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["global_step"] == reference["global_step"] == 6
    torch.testing.assert_close(resumed["model"], reference["model"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["optimizer"]["state"], reference["optimizer"]["state"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["callbacks"]["ema"], reference["callbacks"]["ema"], rtol=0, atol=0)
