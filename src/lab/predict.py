"""Predictions from a checkpoint or an export: raw inputs in, what the task predicts out, one row per input.

`python predict.py ckpt_path=<best.pt | export/model.pt> inputs=<image file or folder | table.csv>
[output=predictions.csv] [top_k=5] [device=auto] [batch_size=32]` (the same key=value syntax as train.py, parsed
by OmegaConf). The model runs between the edges its checkpoint records (`lab.inference.RawInputModel`): images are
read as files are (uint8, resized on the short side and centre-cropped to the model's input size: the one step
outside the model); a CSV's feature columns are taken by name when it has a header (other columns, e.g. the
target, are ignored), else in order. `output=` writes a CSV: the input's name (file path, or the table's line
number), one column per class (probabilities) or target value, and the predicted label(s).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lab.errors import UserError

DEFAULTS = {"ckpt_path": None, "inputs": None, "output": None, "top_k": 5, "device": "auto", "batch_size": 32}


def image_paths(inputs: str | Path) -> list[Path]:
    from lab.data.image_folder import EXTENSIONS

    path = Path(str(inputs)).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(
            "no such image file or folder", f"inputs={path}", "give an image file or a folder of them"
        )
    paths = sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not paths:
        raise UserError("no images in the folder", f"inputs={path}", f"add {', '.join(EXTENSIONS)} files")
    return paths


def load_model(
    ckpt_path: str | Path, device: Any, state: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any], list[str]]:
    """The model in eval mode, its resolved config and its class names.

    `ckpt_path` is a lab checkpoint (full or lean) or an exported `model.pt`, whose config and class names are
    the `config.yaml` and `class_names.json` written beside it by `export.py`. `state`: the file, already loaded.
    """
    import json

    from lab import checkpoint as ckpt
    from lab.models import build_model

    where = f"ckpt_path={ckpt_path}"
    state = ckpt.load(ckpt_path) if state is None else state
    config, class_names = state.get("config"), state.get("class_names")
    beside = Path(str(ckpt_path)).parent
    if config is None and (beside / "config.yaml").is_file():  # an exported model.pt
        config = OmegaConf.to_container(OmegaConf.load(beside / "config.yaml"))
        if (beside / "class_names.json").is_file():
            class_names = json.loads((beside / "class_names.json").read_text())["class_names"]
    if not config or "model" not in config:
        raise UserError(
            "no saved config: neither in the checkpoint nor a config.yaml beside it",
            where,
            "use a checkpoint written by train.py or the model.pt of an export/ folder",
        )
    model_cfg = dict(config["model"])
    if not state.get("frozen"):  # every weight is in the file: no download, no weights file needed
        for key in ("weights", "weights_path"):
            if key in model_cfg:
                model_cfg[key] = None
    model = build_model(model_cfg)
    ckpt.restore_model(model, state, where, inference=True)
    class_names = class_names or [str(i) for i in range(config["dataset"].get("num_classes") or 0)]
    return model.to(device).eval(), config, list(class_names)


def load(ckpt_path: str | Path, device: Any = "cpu") -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The raw-input model (`RawInputModel`) in eval mode, the run's config and the `preprocess` record.

    An exported `model.pt` is loaded as the export says (model.yaml's module, then the state_dict); a lab
    checkpoint's model is wrapped with the record it holds (derived from its config when it is older than that).
    """
    from lab import checkpoint as ckpt
    from lab.inference import RawInputModel, record_from_config

    beside = Path(str(ckpt_path)).parent
    state = ckpt.load(ckpt_path)
    if "config" not in state and (beside / "model.yaml").is_file() and (beside / "config.yaml").is_file():
        spec = OmegaConf.load(beside / "model.yaml")
        if spec.get("_target_") == f"{RawInputModel.__module__}.{RawInputModel.__name__}":
            from hydra.utils import instantiate

            model = instantiate(spec)
            model.load_state_dict(state["model"])
            config = OmegaConf.to_container(OmegaConf.load(beside / "config.yaml"))
            return model.to(device).eval(), config, model.preprocess
    model, config, class_names = load_model(ckpt_path, device, state)
    record = state.get("preprocess") or record_from_config(config, state, class_names)
    return RawInputModel(model, record).to(device).eval(), config, record


@dataclass
class Predictions:
    """One row per input: its name, one value per column (class probabilities or target values), its label(s)."""

    names: list[str]
    columns: list[str]
    values: list[list[float]]
    labels: list[str]
    output: str  # how they were made: softmax, sigmoid or identity (`lab.inference.OUTPUTS`)

    def write_csv(self, path: str | Path) -> None:
        import csv

        label = {"softmax": ["prediction"], "sigmoid": ["labels"]}.get(self.output, [])
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["input", *self.columns, *label])
            for name, values, labels in zip(self.names, self.values, self.labels, strict=True):
                writer.writerow([name, *(f"{v:.6g}" for v in values), *([labels] if label else [])])

    def lines(self, top_k: int) -> list[str]:
        """What the console shows: top-k classes, the labels above the threshold, or the values."""
        out = []
        for name, values, labels in zip(self.names, self.values, self.labels, strict=True):
            pairs = list(zip(self.columns, values, strict=True))
            if self.output == "softmax":
                pairs = sorted(pairs, key=lambda p: -p[1])[: max(1, top_k)]
            text = "  ".join(
                f"{c} {v:.3f}" if self.output != "identity" else f"{c} {v:.6g}" for c, v in pairs
            )
            out.append(
                f"{name}\t{text}" + (f"\tlabels: {labels or '(none)'}" if self.output == "sigmoid" else "")
            )
        return out


def predict(
    ckpt_path: str | Path, inputs: str | Path, device: str = "auto", batch_size: int = 32
) -> Predictions:
    """Predictions for an image file, a folder of images, or a CSV table of feature rows."""
    import torch

    from lab.inference import labels
    from lab.runtime import resolve_device

    torch_device = resolve_device(device)
    model, _, record = load(ckpt_path, torch_device)
    if str(inputs).lower().endswith(".csv"):
        if record["input"] != "table":
            raise UserError(
                "a CSV table given to an image model", f"inputs={inputs}", "give an image or a folder"
            )
        names, x = read_table(inputs, record)
    else:
        if record["input"] != "image":
            raise UserError(
                "a table model takes a CSV file", f"inputs={inputs}", "give a .csv of feature rows"
            )
        names, x = read_images(inputs, record)
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            chunks.append(model(x[start : start + batch_size].to(torch_device)).float().cpu())
    values = torch.cat(chunks)
    return Predictions(
        names, list(record["names"]), values.tolist(), labels(values, record), record["output"]
    )


def read_images(inputs: str | Path, record: dict[str, Any]) -> tuple[list[str], Any]:
    """Image files → uint8 (N, C, H, W) at the model's input size (short side resized, centre crop)."""
    import torch

    from lab.data.image_folder import check_readable, eval_transform, open_image

    paths = image_paths(inputs)
    check_readable([(str(p), 0) for p in paths])
    channels, size = int(record["shape"][0]), int(record["shape"][1])
    to_tensor = eval_transform(size)
    return [str(p) for p in paths], torch.stack([to_tensor(open_image(p, channels)) for p in paths])


def read_table(inputs: str | Path, record: dict[str, Any]) -> tuple[list[str], Any]:
    """A CSV's feature columns → float32 (N, features); each row named by its line number in the file."""
    import csv
    import math

    import torch

    path = Path(str(inputs)).expanduser()
    where = f"inputs={path}"
    if not path.is_file():
        raise UserError("no such file", where, "give a CSV file with one row of features per line")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        rows = [(reader.line_num, [c.strip() for c in row]) for row in reader if any(c.strip() for c in row)]
    header = rows[0][1] if rows and not all(_number(c) is not None for c in rows[0][1]) else None
    rows = rows[1:] if header else rows
    if not rows:
        raise UserError("no rows in the table", where, "one row of feature values per line")
    wanted, count = record.get("feature_names"), int(record["shape"][0])
    if header and wanted:
        missing = [n for n in wanted if n not in header]
        if missing:
            raise UserError(f"column {missing[0]!r} is missing ({len(missing)} of the model's {count} features)",
                            where, f"give the columns {', '.join(wanted)}")  # fmt: skip
        columns = [header.index(n) for n in wanted]
    else:
        columns = list(range(count))
        if any(len(row) != count for _, row in rows):
            width = next(len(row) for _, row in rows if len(row) != count)
            raise UserError(f"a row has {width} values, the model takes {count} features", where,
                            "give exactly the feature columns, or a header row naming them")  # fmt: skip
    names = wanted or (header and [header[c] for c in columns]) or [str(c + 1) for c in columns]
    values = []
    for line, row in rows:
        out = []
        for name, c in zip(names, columns, strict=True):
            value = _number(row[c]) if c < len(row) else None
            if value is None or not math.isfinite(value):
                raise UserError(f"line {line}, column {name}: {row[c] if c < len(row) else '(missing)'!r} is not "
                                "a finite number", where, "fill in every feature value")  # fmt: skip
            out.append(value)
        values.append(out)
    return [str(line) for line, _ in rows], torch.tensor(values, dtype=torch.float32)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_args(argv: list[str], defaults: dict[str, Any], required: tuple[str, ...], usage: str) -> Any:
    """`key=value` arguments (OmegaConf's dotlist syntax, as train.py) over `defaults`; unknown keys refused."""
    base = OmegaConf.create(defaults)
    OmegaConf.set_struct(base, True)
    try:
        cfg = OmegaConf.merge(base, OmegaConf.from_cli(argv))
    except Exception as e:  # an unknown key
        raise UserError(
            str(e).splitlines()[0], " ".join(argv), f"use the keys {', '.join(defaults)}"
        ) from None
    for key in required:
        if cfg[key] is None:
            raise UserError("missing argument", key, usage)
    return cfg


def main(argv: list[str]) -> None:
    try:
        cfg = parse_args(argv, DEFAULTS, ("ckpt_path", "inputs"),
                         "python predict.py ckpt_path=<best.pt> inputs=<image|folder|table.csv>")  # fmt: skip
        result = predict(cfg.ckpt_path, cfg.inputs, cfg.device, cfg.batch_size)
        if cfg.output:
            result.write_csv(cfg.output)
    except UserError as e:
        e.exit()
    print("\n".join(result.lines(cfg.top_k)))
    if cfg.output:
        print(f"wrote {len(result.names)} rows to {cfg.output}")
