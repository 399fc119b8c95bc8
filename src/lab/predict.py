"""Predictions from a checkpoint: rebuild the model from its saved config, preprocess like training, print them.

`python predict.py ckpt_path=... inputs=<image file or folder | table.csv> [top_k=5] [device=auto] [batch_size=32]`
(the same key=value syntax as train.py, parsed by OmegaConf). Images are read as the run's `dataset.channels`,
resized (short side) and centre-cropped to `dataset.image_size`, and normalised with `dataset.mean`/`dataset.std`.
A CSV file (one row of features per line, an optional header) is standardised with the training split's
statistics saved in the checkpoint; each row gets its top-k classes, or the model's outputs for regression.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lab.errors import UserError

DEFAULTS = {"ckpt_path": None, "inputs": None, "top_k": 5, "device": "auto", "batch_size": 32}


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


def predict(ckpt_path: str | Path, inputs: str | Path, top_k: int = 5, device: str = "auto",
            batch_size: int = 32) -> list[tuple[str, list[tuple[str, float]]]]:  # fmt: skip
    """[(image path, [(class name, probability), ...top_k]), ...]"""
    import torch

    from lab.data import Preprocess
    from lab.data.image_folder import check_readable, eval_transform, open_image
    from lab.runtime import resolve_device

    torch_device = resolve_device(device)
    model, config, class_names = load_model(ckpt_path, torch_device)
    data = config["dataset"]
    paths = image_paths(inputs)
    check_readable([(str(p), 0) for p in paths])
    size, channels = int(data["image_size"]), int(data["channels"])
    to_tensor = eval_transform(size)
    preprocess = Preprocess(size, channels, list(data["mean"]), list(data["std"]))
    k = max(1, min(int(top_k), len(class_names)))
    results = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            x = torch.stack([to_tensor(open_image(p, 1 if channels == 1 else 3)) for p in chunk])
            probs = model(preprocess(x.to(torch_device))).softmax(dim=1)
            values, indices = probs.topk(k, dim=1)
            for path, v, i in zip(chunk, values.tolist(), indices.tolist(), strict=True):
                results.append((str(path), [(class_names[c], p) for c, p in zip(i, v, strict=True)]))
    return results


def predict_table(ckpt_path: str | Path, inputs: str | Path, top_k: int = 5,
                  device: str = "auto") -> list[tuple[str, list[tuple[str, float]]]]:  # fmt: skip
    """[(row number, [(class name, probability), ...top_k] or [("value", output), ...]), ...] for a CSV table."""
    import numpy as np
    import torch

    from lab import checkpoint as ckpt
    from lab.runtime import resolve_device

    path = Path(str(inputs)).expanduser()
    if not path.is_file():
        raise UserError("no such file", f"inputs={path}", "give a CSV file with one row of features per line")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        float(lines[0].split(",")[0])
    except (ValueError, IndexError):
        lines = lines[1:]  # a header
    try:
        rows = np.array([[float(v) for v in line.split(",")] for line in lines], dtype=np.float32).reshape(
            len(lines), -1
        )
    except ValueError as e:
        raise UserError(
            f"not a table of numbers ({e})", f"inputs={path}", "one row of numbers per line"
        ) from None
    torch_device = resolve_device(device)
    state = ckpt.load(ckpt_path)
    model, config, class_names = load_model(ckpt_path, torch_device, state)
    stats = state.get("standardize")
    features = int(config["dataset"].get("num_features", rows.shape[1]))
    if rows.shape[1] != features:
        raise UserError(f"rows have {rows.shape[1]} values, the model takes {features}", f"inputs={path}", "")
    x = torch.from_numpy(rows)
    if stats:
        x = (x - torch.tensor(stats["mean"])) / torch.tensor(stats["std"])
    with torch.inference_mode():
        outputs = model(x.to(torch_device)).float().cpu()
    if not config["dataset"].get("num_classes"):  # regression: the outputs themselves
        return [(str(i), [("value", v) for v in row]) for i, row in enumerate(outputs.tolist())]
    values, indices = outputs.softmax(1).topk(max(1, min(int(top_k), len(class_names))), dim=1)
    return [(str(i), [(class_names[c], p) for c, p in zip(ci, vi, strict=True)])
            for i, (vi, ci) in enumerate(zip(values.tolist(), indices.tolist(), strict=True))]  # fmt: skip


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
        if str(cfg.inputs).lower().endswith(".csv"):
            results = predict_table(cfg.ckpt_path, cfg.inputs, cfg.top_k, cfg.device)
        else:
            results = predict(cfg.ckpt_path, cfg.inputs, cfg.top_k, cfg.device, cfg.batch_size)
    except UserError as e:
        e.exit()
    for path, top in results:
        print(f"{path}\t" + "  ".join(f"{name} {p:.3f}" for name, p in top))
