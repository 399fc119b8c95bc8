"""FSDP2 (`trainer.strategy=fsdp`) on the CPU, 2 gloo ranks forked from the test process with torchrun's
environment (`conftest.forked_ranks`): `fully_shard`, a sharded checkpoint written with torch.distributed.checkpoint,
a resume at the same world size and one in a single process, and export, predict.py and the final evaluation on the
result.

The reference is one process with the global batch, in this process: DDP is proven equal to it in test_ddp.py and
test_ddp_loop.py, so FSDP equal to it is FSDP equal to DDP. Tolerance: the same sums in another order in float32
(the gradients are reduce-scattered in pieces), 1e-5 on the losses and gradient norms, 1e-6 on the weights.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import in_process, train
from test_ddp import MODEL, forked_ddp, only_run_dir

# The MLP on wine, 4 optimizer steps an epoch of 2 accumulated batches each (the first without gradient
# reduction), clipped (the norm is taken over every rank's shards). Validation holds 21 samples, 11 and 10 on the
# two ranks: 3 batches of 5 and 2, so the ranks must pad their forwards to stay in step.
RUN = ["dataset=wine", "trainer.limit_train_batches=8", "trainer.accumulate_grad_batches=2",
       "trainer.log_every_n_steps=1", "trainer.gradient_clip_val=0.5"]  # fmt: skip
FSDP = ["trainer.strategy=fsdp", "dataset.batch_size=5"]  # per process
SINGLE = ["dataset.batch_size=10"]  # the global batch


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Epoch 1 under fsdp; epoch 2 resumed from its last.pt under fsdp (asynchronous sharded save, export);
    the reference: both epochs in one process."""
    root = tmp_path_factory.mktemp("fsdp")
    forked_ddp(root / "first", *FSDP, *RUN, "trainer.max_epochs=1")
    first = only_run_dir(root / "first")
    forked_ddp(root / "resumed", *FSDP, *RUN, "trainer.max_epochs=2", "trainer.fsdp.async_save=true",
               f"ckpt_path={first / 'checkpoints' / 'last.pt'}", "export=[state_dict]")  # fmt: skip
    train(root / "single", *MODEL, *RUN, *SINGLE, "trainer.max_epochs=2")
    return {"first": first, "resumed": only_run_dir(root / "resumed"), "single": root / "single"}


def load(run: Path, name: str = "last.pt") -> dict:
    return torch.load(run / "checkpoints" / name, weights_only=True)


def column(run: Path, name: str, steps: range) -> list[float]:
    """`name` logged at `steps` (a resumed run's CSV logger starts from the row of the step it resumed at)."""
    rows = {int(row["step"]): row[name] for row in csv.DictReader((run / "metrics.csv").open()) if row[name]}
    assert set(steps) <= set(rows), (name, sorted(rows))
    return [float(rows[step]) for step in steps]


@pytest.mark.slow
def test_fsdp_trains_as_one_process_with_the_global_batch(runs: dict[str, Path]) -> None:
    first, resumed, single = runs["first"], runs["resumed"], runs["single"]
    assert "fsdp: 3 blocks (Linear x3) and the root sharded over 2 ranks" in (first / "train.log").read_text()
    # The loss curve and gradient norms of epoch 1, step by step, then of epoch 2 (resumed).
    for name in ("train/loss", "train/grad_norm"):
        for run, steps in ((first, range(1, 5)), (resumed, range(5, 9))):
            assert column(run, name, steps) == pytest.approx(column(single, name, steps), abs=1e-5), name
    # The resumed run ends with the weights of the uninterrupted one.
    end, reference = load(resumed), load(single)
    assert end["global_step"] == reference["global_step"] == 8
    torch.testing.assert_close(end["model"], reference["model"], rtol=0, atol=1e-6)
    # The final evaluation (best.pt, val and test: every rank's shard of the splits) is the reference's.
    metrics, expected = (json.loads((run / "metrics.json").read_text()) for run in (resumed, single))
    assert metrics["status"] == "success" and metrics["weights"] == expected["weights"]
    for key in ("val/loss", "val/acc", "test/loss", "test/acc"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key


@pytest.mark.slow
def test_the_sharded_checkpoint_sits_beside_a_plain_last_pt(runs: dict[str, Path]) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    first = runs["first"] / "checkpoints"
    last = load(runs["first"])
    # last.pt: the whole model (rank 0 gathered it) and the loop; the optimizer is in the folder it names.
    assert last["sharded"] == "sharded/step=000004" and "optimizer" not in last
    assert [p.name for p in (first / "sharded").iterdir()] == ["step=000004"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {
        p.name for p in (first / "sharded/step=000004").iterdir()
    }
    best = load(runs["first"], "best.pt")  # the weights alone: predict, export, evaluation
    assert "sharded" not in best and "optimizer" not in best
    # The resumed run's folder, written in the background, is complete and holds last.pt's weights; the folder of
    # the run's earlier last.pt is gone.
    resumed = runs["resumed"] / "checkpoints"
    assert [p.name for p in (resumed / "sharded").iterdir()] == ["step=000008"]
    dcp_to_torch_save(resumed / "sharded/step=000008", resumed.parent / "sharded.pt")
    sharded = torch.load(resumed.parent / "sharded.pt", weights_only=True)
    torch.testing.assert_close(sharded["model"], load(runs["resumed"])["model"], rtol=0, atol=0)
    assert set(sharded["optimizer"]["state"]) == set(sharded["model"])  # Adam's moments of every parameter


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_in_one_process(runs: dict[str, Path], tmp_path: Path) -> None:
    # World size 2 → 1: torch.distributed.checkpoint reshards the optimizer state on load.
    train(
        tmp_path,
        *MODEL,
        *RUN,
        *SINGLE,
        "trainer.max_epochs=2",
        f"ckpt_path={runs['first'] / 'checkpoints/last.pt'}",
    )
    assert "resumed from" in (tmp_path / "train.log").read_text()
    torch.testing.assert_close(load(tmp_path)["model"], load(runs["single"])["model"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_export_and_predict_on_an_fsdp_run(runs: dict[str, Path], tmp_path: Path) -> None:
    from lab.data.tabular import SklearnTable

    resumed, single = runs["resumed"], runs["single"]
    exported = torch.load(resumed / "export" / "model.pt", weights_only=True)  # export=[state_dict] by rank 0
    torch.testing.assert_close(exported, load(single, "best.pt")["model"], rtol=0, atol=1e-6)
    proc = in_process("export.py", [f"ckpt_path={resumed / 'checkpoints/best.pt'}", f"out_dir={tmp_path / 'export'}",
                                    "formats=[onnx]"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "export" / "model.onnx").is_file()

    table = SklearnTable("wine")
    rows = tmp_path / "rows.csv"
    with rows.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table.feature_names)
        writer.writerows(table.data[:5].tolist())
    answers = []
    for run in (resumed, single):
        out = tmp_path / f"{run.name}.csv"
        proc = in_process(
            "predict.py", [f"ckpt_path={run / 'checkpoints/best.pt'}", f"inputs={rows}", f"output={out}"]
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers.append([[float(v) for v in line[1:4]] for line in list(csv.reader(out.open()))[1:]])
    assert len(answers[0]) == 5  # class probabilities, as written (6 decimals)
    torch.testing.assert_close(torch.tensor(answers[0]), torch.tensor(answers[1]), rtol=0, atol=2e-6)


FROZEN = ["model=mobilenet_v3_small_frozen", "model.weights=null", "dataset.image_size=32"]
REFUSED = {
    "a single process": ([], "(trainer.strategy=fsdp)"),
    "the EMA callback": (["callbacks=[default,ema]"], "(callbacks.ema)"),
    "CPU offload on the CPU": (["trainer.fsdp.cpu_offload=true"], "(trainer.fsdp.cpu_offload)"),
    "a frozen backbone": (FROZEN, "(model.freeze)"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_fsdp_cannot_run_is_refused_in_one_line(case: str, tmp_path: Path) -> None:
    overrides, key = REFUSED[case]
    proc = train(tmp_path, "trainer=fsdp", "logger=csv", "trainer.max_epochs=1", *overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and key in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.pt"))  # refused before training
