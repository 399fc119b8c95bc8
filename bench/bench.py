"""How much does the template cost? `make bench` (or `python bench/bench.py --help`).

In one process, on the same data, model, optimizer, batch size and number of epochs, it times

* **hand-written**: a minimal PyTorch loop: `DataLoader(TensorDataset)`, forward, backward, step, and a validation
  pass each epoch (accuracy counted on the device); no logging, no checkpoints; the optimizer class and
  hyper-parameters of the config with torch's default implementation (lab's configs add `fused: true`);
* **lab**: the real `lab.train.run(cfg)` that `python train.py` runs, with logging (TensorBoard, progress bar,
  train.log) and checkpointing (last.pt + best.pt every epoch) at their defaults, timed around `Trainer.fit`:
  - `lab dataloader`: `dataset.in_memory=false`, the same DataLoader path as the hand-written loop;
  - `lab dataloader logger=none`: the same without the TensorBoard logger;
  - `lab in-memory`: the default fast path (whole split on the device, batches by index).

Repetitions are interleaved (hand-written, lab, lab, lab; again ...) after one warm-up round, and the median is
reported. samples/s counts training samples (epochs x train split / wall time of train + validation); for lab that
is the epochs with their logging and checkpoints, while the monitor's once-per-run work at the start (model graph,
image grid) is timed and printed on its own row. It also prints the wall time of one validation pass.

**Start-up**, side by side for the default config (digits, simple_cnn) and a table (wine, mlp), on the CPU: a
one-batch run of lab (`python train.py <case> trainer.max_steps=1 test=false`: one training batch, one validation,
logging and checkpoints at their defaults) against bench/handwritten_run.py (imports torch, loads the same data,
trains one batch of the same model, validates once), each process timed from its start to its first optimizer step
and to its exit, with `python -c "import torch"` for scale; target: lab exits ≤ 1.0 s after the hand-written run.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lab  # noqa: E402, F401  (registers resolvers)
from lab import trainer as lab_trainer  # noqa: E402
from lab.data import build_data  # noqa: E402
from lab.optim import OPTIMIZER_KEYS  # noqa: E402
from lab.train import run  # noqa: E402

# Targets on the CPU: lab / hand-written.
TARGETS = {"lab dataloader": 0.97, "lab dataloader logger=none": 0.99, "lab in-memory": 1.5}
MODES = {
    "lab dataloader": ["dataset.in_memory=false"],
    "lab dataloader logger=none": ["dataset.in_memory=false", "logger=none"],
    "lab in-memory": [],
}
DATASETS = {  # name → overrides; the MNIST-sized set is generated (60,000 x 1 x 28 x 28)
    "digits": ["dataset=digits"],
    "mnist-sized": ["dataset=synthetic"],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compose_cfg(overrides: list[str], output_dir: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "train", overrides=[f"paths.output_dir={output_dir}", "print_config=false", *overrides]
        )


def handwritten(cfg, splits, epochs: int, device: torch.device) -> float:
    """The loop a user would write by hand; returns seconds for `epochs` epochs of train + validation."""
    torch.manual_seed(cfg.trainer.seed)
    model = instantiate(cfg.model).to(device)
    # The same optimizer and hyper-parameters, with torch's default implementation (what a hand-written loop
    # gets); lab's configs choose `fused: true`, which is part of what is measured.
    torch_args = {
        k: v for k, v in cfg.optimizer.items() if k not in OPTIMIZER_KEYS
    }  # lab's own keys left out
    optimizer = instantiate(torch_args, fused=None)(model.parameters())
    workers = cfg.dataset.num_workers or 0
    pin = device.type == "cuda"
    common = dict(
        batch_size=cfg.dataset.batch_size, num_workers=workers, pin_memory=pin, persistent_workers=workers > 0
    )
    train = DataLoader(splits.train, shuffle=True, **common)
    val = DataLoader(splits.val, **common)
    sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in train:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = torch.zeros((), device=device, dtype=torch.long)
        with torch.no_grad():
            for x, y in val:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                correct += (model(x).argmax(1) == y).sum()
        correct.item()  # the hand-written loop reads its accuracy once per epoch
    sync(device)
    return time.perf_counter() - start


class FitTimer:
    """Wraps `Trainer.fit` and `Trainer.evaluate` to time the real loop inside `lab.train.run`.

    `fit_seconds` is the wall time of the epochs (training, validation, logging, checkpoints); the monitor's
    once-per-run work in `on_fit_start` / `on_fit_end` (model graph, image grid) does not grow with the data or
    the epochs and is reported on its own as `once_seconds`.
    """

    def __init__(self) -> None:
        self.fit_seconds = 0.0
        self.once_seconds = 0.0
        self.val_seconds: list[float] = []
        self._fit, self._evaluate = lab_trainer.Trainer.fit, lab_trainer.Trainer.evaluate
        self._callback = lab_trainer.Trainer.callback

    def __enter__(self) -> FitTimer:
        timer, fit, evaluate, callback = self, self._fit, self._evaluate, self._callback

        def timed_callback(trainer, hook, *args):
            if hook not in ("on_fit_start", "on_fit_end"):
                return callback(trainer, hook, *args)
            sync(trainer.device)
            start = time.perf_counter()
            callback(trainer, hook, *args)
            sync(trainer.device)
            timer.once_seconds += time.perf_counter() - start

        def timed_fit(trainer, *args, **kwargs):
            sync(trainer.device)
            start = time.perf_counter()
            try:
                return fit(trainer, *args, **kwargs)
            finally:
                sync(trainer.device)
                timer.fit_seconds = time.perf_counter() - start - timer.once_seconds

        def timed_evaluate(trainer, stage, *args, **kwargs):
            start = time.perf_counter()
            result = evaluate(trainer, stage, *args, **kwargs)  # returns floats: already synchronised
            if stage == "val":
                timer.val_seconds.append(time.perf_counter() - start)
            return result

        lab_trainer.Trainer.fit, lab_trainer.Trainer.evaluate = timed_fit, timed_evaluate
        lab_trainer.Trainer.callback = timed_callback
        return self

    def __exit__(self, *exc) -> None:
        lab_trainer.Trainer.fit, lab_trainer.Trainer.evaluate = self._fit, self._evaluate
        lab_trainer.Trainer.callback = self._callback


def lab_run(overrides: list[str], workdir: Path) -> FitTimer:
    output_dir = tempfile.mkdtemp(dir=workdir)
    cfg = compose_cfg(overrides, output_dir)
    # What Hydra's job logging does for `python train.py`: INFO lines to <run dir>/train.log.
    handler = logging.FileHandler(Path(output_dir) / "train.log")
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    try:
        with FitTimer() as timer:
            run(cfg)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    return timer


def bench_case(dataset: str, model: str, args, workdir: Path) -> list[dict]:
    base = [
        *DATASETS[dataset],
        f"model={model}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.device={args.device}",
        f"dataset.num_workers={args.num_workers}",
        "test=false",
        *args.overrides,
    ]
    cfg = compose_cfg(base, str(workdir))
    splits = build_data(cfg.dataset)  # the same preprocessed tensors that lab trains on
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    if args.device == "auto" and device.type != "cuda":
        device = torch.device("cpu")
    n_train = len(splits.train) * args.epochs
    times: dict[str, list[float]] = {"hand-written": [], **{mode: [] for mode in MODES}}
    val_times: list[float] = []
    once_times: list[float] = []
    for rep in range(args.reps + 1):  # round 0 warms up (imports, allocator, cudnn autotuning) and is dropped
        hand = handwritten(cfg, splits, args.epochs, device)
        lab_times = {mode: lab_run([*base, *extra], workdir) for mode, extra in MODES.items()}
        if rep == 0:
            continue
        times["hand-written"].append(hand)
        for mode, timer in lab_times.items():
            times[mode].append(timer.fit_seconds)
        val_times += lab_times["lab in-memory"].val_seconds
        once_times.append(lab_times["lab in-memory"].once_seconds)
    hand_rate = n_train / statistics.median(times["hand-written"])
    rows = [{"case": f"{dataset} {model}", "mode": "hand-written DataLoader", "samples_s": hand_rate}]
    for mode in MODES:
        rate = n_train / statistics.median(times[mode])
        rows.append({"case": f"{dataset} {model}", "mode": mode, "samples_s": rate, "ratio": rate / hand_rate,
                     "target": TARGETS[mode]})  # fmt: skip
    epoch_s = statistics.median(times["lab in-memory"]) / args.epochs
    val_s = statistics.median(val_times)
    rows.append({"case": f"{dataset} {model}", "mode": "validation pass (in-memory)",
                 "note": f"{val_s * 1000:.1f} ms per epoch = {100 * val_s / epoch_s:.1f}% of an epoch"})  # fmt: skip
    rows.append({"case": f"{dataset} {model}", "mode": "once per run: monitor graph + images (not in samples/s)",
                 "note": f"{statistics.median(once_times) * 1000:.0f} ms"})  # fmt: skip
    return rows


STARTUP_CASES = {  # name → (train.py overrides, bench/handwritten_run.py argument)
    "digits simple_cnn": (["dataset=digits", "model=simple_cnn"], "digits"),
    "wine mlp": (["dataset=wine", "model=mlp"], "wine"),
}


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def probe(root: Path, script: str, args: list[str]) -> dict[str, float | str]:
    """Runs `python <root>/<script> <args>` (its own `src/` first on the path) under bench/first_step.py: seconds
    from its start to its first optimizer step and to its exit, the CPU seconds it used, and the optional libraries
    it imported."""
    cmd = [sys.executable, str(ROOT / "bench" / "first_step.py"), str(root / script), *args]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    cpu, start_wall, start = child_cpu_seconds(), time.time(), time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=root, check=True, capture_output=True, text=True).stdout
    end, cpu = time.perf_counter() - start, child_cpu_seconds() - cpu
    lines = dict(
        line.split(" ", 1) for line in out.splitlines() if line.startswith(("FIRST_STEP ", "IMPORTED "))
    )
    step = float(lines["FIRST_STEP"]) - start_wall
    return {"step": step, "end": end, "cpu": cpu, "imported": lines["IMPORTED"].strip() or "none"}


def startup(args, workdir: Path) -> list[dict]:
    """A one-batch run of lab (`python train.py <case> trainer.max_steps=1 test=false`: one training batch, one
    validation, default logging and checkpoints) against bench/handwritten_run.py on the same data and model, and
    `python -c "import torch"`; interleaved, one warm-up round, medians. CPU seconds are printed beside the wall
    time: on a machine shared with other work they move much less than wall time does. `--startup-against DIR`
    times DIR's train.py too (another checkout, e.g. a worktree of an earlier commit) in the same rounds, the two
    taking turns at going first."""
    labs = {
        "lab": ROOT,
        **({"lab (against)": Path(args.startup_against).resolve()} if args.startup_against else {}),
    }
    one_batch = ["trainer.max_steps=1", "test=false", "trainer.device=cpu"]
    rows = []
    for case, (overrides, data) in STARTUP_CASES.items():
        print(f"timing start-up: {case} ...", flush=True)
        runs: dict[str, list[dict]] = {"torch": [], "hand-written": [], **{who: [] for who in labs}}
        for rep in range(args.reps + 1):
            this_round = {
                "torch": import_torch(),
                "hand-written": probe(ROOT, "bench/handwritten_run.py", [data]),
            }
            order = list(labs.items())[:: -1 if rep % 2 else 1]
            for i, (who, root) in enumerate(order):
                run_dir = f"hydra.run.dir={workdir}/startup_{rep}_{data}_{i}"
                this_round[who] = probe(root, "train.py", [*overrides, *one_batch, run_dir, *args.overrides])
            if rep > 0:  # round 0 warms the file cache
                for who, run in this_round.items():
                    runs[who].append(run)
        med = {who: {k: statistics.median(r[k] for r in rs) for k in ("step", "end", "cpu") if k in rs[0]}
               for who, rs in runs.items()}  # fmt: skip
        rows.append({"case": f"startup {case}", "mode": "python -c 'import torch'",
                     "note": f"{med['torch']['end']:.2f} s (CPU {med['torch']['cpu']:.2f} s)"})  # fmt: skip
        for who in ("hand-written", *labs):
            m, cpus = med[who], [r["cpu"] for r in runs[who]]
            rows.append({"case": f"startup {case}", "mode": f"{who} one-batch run: first step / exit",
                         "note": f"{m['step']:.2f} s / {m['end']:.2f} s (CPU {m['cpu']:.2f} s, rounds "
                                 f"{min(cpus):.2f}–{max(cpus):.2f})"})  # fmt: skip
        for who in labs:
            extra = med[who]["end"] - med["hand-written"]["end"]
            extra_cpu = med[who]["cpu"] - med["hand-written"]["cpu"]
            rows.append({"case": f"startup {case}", "mode": f"{who} − hand-written at exit (target ≤ +1.0 s)",
                         "note": f"{extra:+.2f} s ({'met' if extra <= 1.0 else 'MISSED'}; CPU {extra_cpu:+.2f} s); "
                                 f"imported: {runs[who][-1]['imported']}"})  # fmt: skip
    return rows


def import_torch() -> dict[str, float]:
    cpu, start = child_cpu_seconds(), time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], cwd=ROOT, check=True, capture_output=True)
    return {"end": time.perf_counter() - start, "cpu": child_cpu_seconds() - cpu}


def print_table(rows: list[dict]) -> None:
    print("\n| case | mode | samples/s | lab / hand-written | target | |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        if "note" in r:
            print(f"| {r['case']} | {r['mode']} | | | | {r['note']} |")
            continue
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        target = f"≥ {r['target']}x" if "target" in r else ""
        ok = ("met" if r["ratio"] >= r["target"] else "MISSED") if "target" in r else ""
        print(f"| {r['case']} | {r['mode']} | {r['samples_s']:,.0f} | {ratio} | {target} | {ok} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="digits:simple_cnn,digits:mlp,mnist-sized:mlp",
                        help="dataset:model pairs; datasets: " + ", ".join(DATASETS))  # fmt: skip
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median), after one warm-up")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers, both loops")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--skip-startup", action="store_true", help="skip the start-up comparison")
    parser.add_argument("--startup-against", metavar="DIR",
                        help="also time the train.py of another checkout in the start-up rounds")  # fmt: skip
    parser.add_argument(
        "overrides", nargs="*", help="extra train.py overrides for every lab run and the shared setup"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device != "cpu" and torch.cuda.is_available() else ""))  # fmt: skip
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lab-bench-") as tmp:
        workdir = Path(tmp)
        for case in filter(None, args.cases.split(",")):  # --cases "": start-up only
            dataset, model = case.split(":")
            print(f"timing {dataset} / {model} ({args.reps} reps x {args.epochs} epochs) ...", flush=True)
            rows += bench_case(dataset, model, args, workdir)
            print_table(rows[-6:])
        if not args.skip_startup:
            rows += startup(args, workdir)
            print_table([row for row in rows if row["case"].startswith("startup ")])
    print_table(rows)


if __name__ == "__main__":
    main()
