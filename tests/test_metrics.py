"""lab's default metrics (`lab.tasks.metrics`) against torchmetrics, their states (checkpoint, compute, reset, DDP),
and a torchmetrics metric in `task.metrics` beside them in a run."""

from __future__ import annotations

import datetime
import functools
import importlib
import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import QUIET, free_port, train

from lab.tasks import metrics

NUM_CLASSES, NUM_LABELS = 10, 6
ONE_EPOCH = ("trainer.max_epochs=1", "logger=none", "monitor=none", "checkpoint=none")


def logits(n: int, width: int) -> torch.Tensor:
    return torch.randn(n, width) * 3  # many outside [0, 1]: torchmetrics applies the sigmoid, as lab does


def multiclass(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return logits(n, NUM_CLASSES), torch.randint(0, NUM_CLASSES, (n,))


def multilabel(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    preds, target = logits(n, NUM_LABELS), torch.randint(0, 2, (n, NUM_LABELS))
    target[:, 2] = 0  # a label that never occurs...
    preds[:, 2] = -5.0  # ...and is never predicted: F1 0 for it, as in torchmetrics
    return preds, target


def regression(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n) * 2 + 1, torch.randn(n)


def pair(name: str, data: Callable, *args: object, theirs: dict | None = None, **kwargs: object) -> tuple:
    """lab's metric `name`, torchmetrics' of the same name with the same arguments (and `theirs`), and `data`."""
    library = "regression" if data is regression else "classification"
    ours = functools.partial(getattr(metrics, name), *args, **kwargs)
    return (
        ours,
        functools.partial(torchmetrics_metric, library, name, *args, **kwargs, **(theirs or {})),
        data,
    )


def torchmetrics_metric(module: str, name: str, *args: object, **kwargs: object):
    """`torchmetrics.<module>.<name>(...)`, imported when a test builds one: importing torchmetrics costs each pytest
    worker seconds when it collects this file."""
    return getattr(importlib.import_module(f"torchmetrics.{module}"), name)(*args, **kwargs)


MICRO = {"average": "micro"}  # torchmetrics' accuracy averages over classes by default; lab's over samples
# id → (lab's metric, the torchmetrics one it stands for, a batch of n samples)
PAIRS: dict[str, tuple[Callable, Callable, Callable]] = {
    "acc": pair("MulticlassAccuracy", multiclass, NUM_CLASSES, theirs=MICRO),
    "acc_top5": pair("MulticlassAccuracy", multiclass, NUM_CLASSES, top_k=5, theirs=MICRO),
    "multilabel_acc": pair("MultilabelAccuracy", multilabel, NUM_LABELS, theirs=MICRO),
    "multilabel_acc_threshold": pair(
        "MultilabelAccuracy", multilabel, NUM_LABELS, threshold=0.3, theirs=MICRO
    ),
    **{
        f"f1_{average}": pair("MultilabelF1Score", multilabel, NUM_LABELS, average=average)
        for average in metrics.F1_AVERAGES
    },
    "mse": pair("MeanSquaredError", regression),
    "mae": pair("MeanAbsoluteError", regression),
}
BATCHES = (17, 64, 5, 33)


def batches(case: str, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    return [PAIRS[case][2](n) for n in BATCHES]


def fed(metric, data) -> torch.Tensor:
    for preds, target in data:
        metric.update(preds, target)
    return metric.compute()


@pytest.mark.parametrize("case", PAIRS)
def test_each_metric_equals_torchmetrics_over_several_batches(case: str) -> None:
    ours, theirs, _ = PAIRS[case]
    for seed in range(3):
        data = batches(case, seed)
        expected = fed(theirs(), data)
        assert float(fed(ours(), data)) == pytest.approx(float(expected), rel=1e-5, abs=1e-6), seed


def test_f1_of_a_label_never_present_nor_predicted_is_zero_in_the_macro_mean() -> None:
    f1 = metrics.MultilabelF1Score(2)
    f1.update(torch.tensor([[5.0, -5.0], [-5.0, -5.0]]), torch.tensor([[1, 0], [0, 0]]))
    assert float(f1.compute()) == pytest.approx(0.5)  # label 0 perfect, label 1 counts as 0


@pytest.mark.parametrize("case", ["acc_top5", "f1_macro", "mae"])
def test_a_state_dict_saved_midway_gives_the_same_result_and_compute_changes_nothing(case: str) -> None:
    ours, _, _ = PAIRS[case]
    data = batches(case)
    whole = ours()
    expected = fed(whole, data)
    assert torch.equal(whole.compute(), expected)  # compute() twice: the same value...
    first = ours()
    fed(first, data[:2])
    state = {k: v.clone() for k, v in first.state_dict().items()}
    first.compute()
    assert all(torch.equal(v, state[k]) for k, v in first.state_dict().items())  # ...and the same states
    resumed = ours()
    resumed.load_state_dict(torch.load(_saved(state), weights_only=True))
    assert torch.equal(fed(resumed, data[2:]), expected)
    resumed.reset()
    assert all(not v.any() for v in resumed.state_dict().values())
    assert torch.equal(fed(resumed, data), expected)


def _saved(state: dict) -> object:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_persistent_switches_the_states_in_and_out_of_the_state_dict() -> None:
    metric = metrics.MulticlassAccuracy(3)
    assert set(metric.state_dict()) == {"correct", "total"}
    metric.persistent(False)
    assert metric.state_dict() == {}
    metric.persistent(True)
    assert set(metric.state_dict()) == {"correct", "total"}


@pytest.mark.parametrize(
    ("build", "says"),
    [
        (lambda: metrics.MulticlassAccuracy(0), "num_classes"),
        (lambda: metrics.MulticlassAccuracy(10, top_k=0), "top_k"),
        (lambda: metrics.MultilabelAccuracy(4, threshold=1.0), "threshold"),
        (lambda: metrics.MultilabelF1Score(4, threshold=0.0), "threshold"),
        (lambda: metrics.MultilabelF1Score(4, average="macroo"), "average"),
        (lambda: metrics.MultilabelF1Score(0), "num_labels"),
    ],
)
def test_bad_arguments_are_rejected_when_built(build: Callable, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        build()


def test_a_top_k_above_the_classes_is_built_for_the_task_to_leave_out() -> None:
    assert metrics.MulticlassAccuracy(3, top_k=5).top_k == 5


def test_regression_preds_of_another_shape_are_an_error_not_a_broadcast() -> None:
    with pytest.raises(ValueError, match="shape"):
        metrics.MeanSquaredError().update(torch.zeros(4, 1), torch.zeros(4))


def test_under_ddp_compute_is_the_value_over_every_rank(tmp_path: Path) -> None:
    """Two ranks forked from this process each update with half the data; both compute the value of all of it."""
    cases = ["acc_top5", "f1_macro", "mse"]
    data = {case: batches(case) for case in cases}
    port, pids = free_port(), []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                torch.distributed.init_process_group(
                    "gloo",
                    init_method=f"tcp://127.0.0.1:{port}",
                    rank=rank,
                    world_size=2,
                    timeout=datetime.timedelta(seconds=60),
                )
                values = {}
                for case in cases:
                    metric = PAIRS[case][0]()
                    fed(metric, data[case][rank::2])
                    local = {k: v.clone() for k, v in metric.state_dict().items()}
                    values[case] = [float(metric.compute()), float(metric.compute())]
                    assert all(torch.equal(v, local[k]) for k, v in metric.state_dict().items())
                torch.distributed.destroy_process_group()
                (tmp_path / f"rank{rank}.json").write_text(json.dumps(values))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    assert [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids] == [0, 0]
    for rank in range(2):
        values = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case in cases:
            expected = float(fed(PAIRS[case][0](), data[case]))
            assert values[case] == pytest.approx([expected, expected], rel=1e-6), (rank, case)


def test_a_torchmetrics_metric_in_task_metrics_runs_beside_the_defaults(tmp_path: Path) -> None:
    tm_acc = (
        "+task.metrics.tm_acc={_target_: torchmetrics.classification.MulticlassAccuracy, "
        "num_classes: ${dataset.num_classes}, average: micro}"
    )
    run_dir = tmp_path / "run"
    train(run_dir, *QUIET, *ONE_EPOCH, "dataset=wine", "model=mlp", tm_acc)
    result = json.loads((run_dir / "metrics.json").read_text())
    for stage in ("val", "test"):
        assert result[f"{stage}/tm_acc"] == pytest.approx(result[f"{stage}/acc"], abs=1e-6)


def test_a_mid_epoch_state_of_another_metric_class_is_one_line_naming_the_metric() -> None:
    """A checkpoint written while `acc` was another class (e.g. torchmetrics' before lab had its own) is refused
    when resumed, naming the metric, instead of a `load_state_dict` traceback."""
    from lab.errors import UserError
    from lab.metrics import Sums
    from lab.tasks import Task

    def sums(metric) -> Sums:
        return Sums(Task(torch.nn.MSELoss(), {"acc": metric}, (3,)), torch.device("cpu"))

    written = sums(torchmetrics_metric("classification", "MulticlassAccuracy", num_classes=3)).state_dict()
    with pytest.raises(UserError, match=r"metric 'acc' .*task\.metrics\.acc"):
        sums(metrics.MulticlassAccuracy(num_classes=3)).load_state_dict(written)
    sums(torchmetrics_metric("classification", "MulticlassAccuracy", num_classes=3)).load_state_dict(
        written
    )  # the same class loads
