"""Share a trained model: `python export.py ckpt_path=<run>/checkpoints/best.pt [formats=[...]]`. → conf/export.yaml

Writes `<run>/export/` (beside the `checkpoints/` folder); the exported model takes RAW inputs and answers what
predict.py answers (`lab.inference.RawInputModel`: the checkpoint's `preprocess` record around the model):

- `model.yaml`: the raw-input module (the model's config, weights off, and the record); the tutorials' two lines,
  instantiate `model.yaml` and `load_state_dict` what torch loads from `model.pt`, rebuild it (docs/export.md)
- `model.pt`: the model's plain, complete state_dict (also from a lean checkpoint); `model.safetensors`: the same
- `model.onnx`: the raw-input module, dynamic batch axis, input `input`, output `predictions`; checked against
  PyTorch with onnxruntime when it is installed
- `README.md`: the raw input it expects (dtype, shape, value range, column order) and what it answers
- `class_names.json`, `config.yaml` (the run's resolved config)

`export=[state_dict,onnx]` on `train.py` does the same for `best.pt` at the end of training (`maybe_export`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lab.config import EXPORT_FORMATS
from lab.errors import UserError

log = logging.getLogger(__name__)

FORMATS = EXPORT_FORMATS
# ONNX Runtime and PyTorch run different kernels: logits agree to this (float32, CPU).
ONNX_ATOL, ONNX_RTOL = 1e-4, 1e-3


def export_dir_for(ckpt_path: Path) -> Path:
    """`<run>/checkpoints/best.pt` → `<run>/export`; any other file → `export/` beside it."""
    parent = ckpt_path.resolve().parent
    return parent.parent / "export" if parent.name == "checkpoints" else parent / "export"


def check_formats(formats: Sequence[str], key: str = "formats") -> list[str]:
    formats = [str(f) for f in formats]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"unknown export format {unknown[0] if unknown else '(none)'}", key,
                        f"use a list of {', '.join(FORMATS)}, e.g. {key}=[state_dict,onnx]")  # fmt: skip
    return formats


def export(
    ckpt_path: str | Path,
    formats: Sequence[str] = FORMATS,
    out_dir: str | Path | None = None,
    opset: int | None = None,
    check: bool = True,
) -> Path:
    """Write the export folder for `ckpt_path` (see the module docstring); returns its path."""
    import torch

    from lab.predict import load

    formats = check_formats(formats)
    ckpt_path = Path(str(ckpt_path))
    model, config, record = load(ckpt_path, torch.device("cpu"))
    out = Path(str(out_dir)) if out_dir else export_dir_for(ckpt_path)
    out.mkdir(parents=True, exist_ok=True)
    if "state_dict" in formats:
        torch.save({key: value.contiguous() for key, value in model.state_dict().items()}, out / "model.pt")
    if "safetensors" in formats:
        save_safetensors(model.model, out / "model.safetensors")
    if "onnx" in formats:
        save_onnx(model, raw_example(record), out / "model.onnx", opset, check)
    model_cfg = dict(config["model"])
    for key in ("weights", "weights_path"):  # every weight is in model.pt: no download, no file needed
        if key in model_cfg:
            model_cfg[key] = None
    spec = {
        "_target_": "lab.inference.RawInputModel",
        "_convert_": "all",
        "model": model_cfg,
        "preprocess": record,
    }
    (out / "model.yaml").write_text(OmegaConf.to_yaml(spec))
    (out / "config.yaml").write_text(OmegaConf.to_yaml(config))
    (out / "class_names.json").write_text(json.dumps({"class_names": record["names"]}, indent=2) + "\n")
    (out / "README.md").write_text(describe(record, formats))
    log.info("exported %s (%s) to %s", ckpt_path, ", ".join(formats), out)
    return out


def raw_example(record: dict[str, Any]) -> Any:
    """Two raw inputs as the export takes them: uint8 images, or float32 table rows."""
    import torch

    shape = (2, *(int(n) for n in record["shape"]))
    generator = torch.Generator().manual_seed(0)
    if record["input"] == "image":
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    return torch.randn(shape, generator=generator) * torch.tensor(record.get("std") or 1.0) + torch.tensor(
        record.get("mean") or 0.0
    )  # rows around the training data's values


def describe(record: dict[str, Any], formats: Sequence[str]) -> str:
    """export/README.md: what goes in and what comes out, for someone who has only this folder."""
    names = ", ".join(record["names"])
    if record["input"] == "image":
        c, h, w = record["shape"]
        given = (f"`uint8` images, shape (N, {c}, {h}, {w}) (N, channels, height, width), values 0..255, "
                 f"{'grayscale' if c == 1 else 'RGB'}. Resize (short side to {h}) and centre-crop to {h}×{w} "
                 f"first: that is the one step outside the model. Inside: /255, then (x - mean) / std with "
                 f"mean {record['mean']} and std {record['std']}.")  # fmt: skip
    else:
        columns = record.get("feature_names") or [f"column {i + 1}" for i in range(record["shape"][0])]
        inside = ("Inside: each column is standardised with the training split's mean and std (model.yaml, "
                  "`preprocess`)." if record.get("mean") else "The model takes them as they are.")  # fmt: skip
        given = (f"`float32` rows, shape (N, {record['shape'][0]}), the raw values as the table holds them, "
                 f"columns in this order: {', '.join(columns)}. {inside}")  # fmt: skip
    answer = {
        "softmax": f"class probabilities (N, {len(record['names'])}), each row sums to 1; columns: {names}",
        "sigmoid": f"one probability per label (N, {len(record['names'])}); a label is predicted when it is at "
        f"least {record['threshold']}; columns: {names}",
        "identity": f"values in the target's units (N, {len(record['names'])}); columns: {names}",
    }[record["output"]]
    files = ["model.yaml + model.pt"] + ["model.onnx"] * ("onnx" in formats)
    return (f"# Exported model\n\nInput ({' and '.join(files)}; ONNX input name `input`): {given}\n\n"
            f"Output (ONNX output name `predictions`): {answer}.\n\n"
            "The same numbers as `python predict.py ckpt_path=model.pt inputs=...` on the same raw inputs.\n")  # fmt: skip


def save_safetensors(model: Any, path: Path) -> None:
    try:
        from safetensors.torch import save_model
    except ImportError:
        raise UserError("the safetensors package is not installed", "formats",
                        "pip install safetensors (or `pip install -e .[export]`), or drop safetensors from formats") from None  # fmt: skip
    save_model(model, str(path))  # handles tensors that share memory


def save_onnx(model: Any, example: Any, path: Path, opset: int | None = None, check: bool = True) -> None:
    """torch.onnx's exporter (torch.export based) with a dynamic batch axis; then onnxruntime must agree."""
    import torch

    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError:
            raise UserError(f"the {package} package is not installed", "formats",
                            "pip install onnx onnxscript (or `pip install -e .[export]`), or drop onnx from formats") from None  # fmt: skip
    model = model.eval()
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one INFO line per optimisation pass otherwise
    try:
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["predictions"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset,
                          dynamo=True, verbose=False, external_data=False)  # fmt: skip
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"ONNX cannot export {type(model).__name__} ({type(e).__name__}: {first})",
                        "formats", "export state_dict/safetensors only, or make the model's forward "
                        "traceable by torch.export") from None  # fmt: skip
    if check:
        check_onnx(model, path, example)


def check_onnx(model: Any, path: Path, example: Any) -> float | None:
    """Max |onnxruntime - PyTorch| on `example` and on a batch of another size; None without onnxruntime."""
    import torch

    try:
        import onnxruntime
    except ImportError:
        log.info("onnxruntime not installed: %s not checked", path.name)
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in (example, torch.cat([example, example, example[:1]])):  # the batch axis is dynamic
        with torch.no_grad():
            expected = model(x)
        try:
            (got,) = session.run(["predictions"], {"input": x.numpy()})
        except Exception as e:  # e.g. a forward that fixes the batch size (`len(x)` in a reshape)
            raise UserError(f"onnxruntime cannot run the ONNX model on a batch of {len(x)} "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:150]})", str(path),
                            "make the model's forward independent of the batch size (e.g. x.flatten(1))") from None  # fmt: skip
        got = torch.from_numpy(got)
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=ONNX_ATOL, rtol=ONNX_RTOL):
            raise UserError(f"onnxruntime's outputs differ from PyTorch's (max diff {(got - expected).abs().max():.2e})",
                            str(path), "export state_dict/safetensors only, or report the model") from None  # fmt: skip
        worst = max(worst, float((got - expected).abs().max()))
    log.info("%s: onnxruntime matches PyTorch (max |diff| %.1e, batch sizes %d and %d)", path.name, worst,
             len(example), 2 * len(example) + 1)  # fmt: skip
    return worst


def maybe_export(cfg: Any, best_path: Path, loggers: Any) -> Path | None:
    """`export=[...]` on train.py: export `best.pt` once training is done; logged as a model artifact."""
    formats = OmegaConf.select(cfg, "export", default=None)
    if not formats or not cfg.train or not best_path.is_file():
        return None
    out = export(best_path, check_formats(formats, key="export"))
    loggers.log_export(out)
    return out


def main(argv: list[str], defaults_path: Path) -> None:
    """`python export.py ckpt_path=... [formats=[...]] [out_dir=...] [opset=...] [check=true]`."""
    from lab.predict import parse_args

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        defaults = OmegaConf.to_container(OmegaConf.load(defaults_path))
        cfg = parse_args(argv, defaults, required=("ckpt_path",),
                         usage="python export.py ckpt_path=<run>/checkpoints/best.pt")  # fmt: skip
        out = export(cfg.ckpt_path, list(cfg.formats), cfg.out_dir, cfg.opset, cfg.check)
    except UserError as e:
        e.exit()
    print(out)
