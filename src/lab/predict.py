"""Predictions from a checkpoint: rebuild the model from its saved config, preprocess like training, print top-k.

`python predict.py ckpt_path=... inputs=<image file or folder> [top_k=5] [device=auto] [batch_size=32]`
(the same key=value syntax as train.py, parsed by OmegaConf). Images are read as the run's `dataset.channels`,
resized (short side) and centre-cropped to `dataset.image_size`, and normalised with `dataset.mean`/`dataset.std`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lab.errors import EXIT_USER_ERROR, UserError

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


def load_model(ckpt_path: str | Path, device: Any) -> tuple[Any, dict[str, Any], list[str]]:
    """The checkpoint's model in eval mode, its resolved config and its class names."""
    from lab import checkpoint as ckpt
    from lab.models import build_model

    state = ckpt.load(ckpt_path)
    config = state.get("config")
    if not config or "model" not in config:
        raise UserError(
            "the checkpoint has no saved config", f"ckpt_path={ckpt_path}", "use a lab checkpoint"
        )
    model_cfg = dict(config["model"])
    for key in ("weights", "weights_path"):  # every weight is in the checkpoint: no download, no file
        if key in model_cfg:
            model_cfg[key] = None
    model = build_model(model_cfg)
    ckpt.load_model_state(model, ckpt.inference_weights(state), f"ckpt_path={ckpt_path}")
    class_names = state.get("class_names") or [str(i) for i in range(config["dataset"]["num_classes"])]
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


def main(argv: list[str]) -> None:
    try:
        base = OmegaConf.create(DEFAULTS)
        OmegaConf.set_struct(base, True)
        try:
            cfg = OmegaConf.merge(base, OmegaConf.from_cli(argv))
        except Exception as e:  # an unknown key
            raise UserError(
                str(e).splitlines()[0], " ".join(argv), f"use the keys {', '.join(DEFAULTS)}"
            ) from None
        for key in ("ckpt_path", "inputs"):
            if cfg[key] is None:
                raise UserError(
                    "missing argument", key, "python predict.py ckpt_path=<best.pt> inputs=<image|folder>"
                )
        results = predict(cfg.ckpt_path, cfg.inputs, cfg.top_k, cfg.device, cfg.batch_size)
    except UserError as e:
        print(e.line(), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    for path, top in results:
        print(f"{path}\t" + "  ".join(f"{name} {p:.3f}" for name, p in top))
