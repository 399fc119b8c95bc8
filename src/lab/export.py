"""Share a trained model: `python export.py ckpt_path=<run>/checkpoints/best.pt [formats=[...]]`. → conf/export.yaml

Writes `<run>/export/` (beside the `checkpoints/` folder):

- `model.pt`: a plain, complete state_dict (also from a lean checkpoint): the tutorials' two lines, instantiate
  `model.yaml` and `load_state_dict` what torch loads from `model.pt`, rebuild the model (docs/export.md)
- `model.safetensors`: the same tensors in the safetensors format
- `model.onnx`: dynamic batch axis, input `input` (N, C, H, W) normalised like training, output `logits`;
  checked against PyTorch with onnxruntime when it is installed
- `model.yaml` (the model's config, weights off: they are all in model.pt), `class_names.json`, `config.yaml`
  (the run's resolved config: preprocessing for `predict.py`)

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

    from lab.predict import load_model

    formats = check_formats(formats)
    ckpt_path = Path(str(ckpt_path))
    model, config, class_names = load_model(ckpt_path, torch.device("cpu"))
    out = Path(str(out_dir)) if out_dir else export_dir_for(ckpt_path)
    out.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    if "state_dict" in formats:
        torch.save(state, out / "model.pt")
    if "safetensors" in formats:
        save_safetensors(model, out / "model.safetensors")
    if "onnx" in formats:
        example = torch.rand(2, *(int(n) for n in config["dataset"]["input_shape"]))  # images or table rows
        save_onnx(model, example, out / "model.onnx", opset, check)
    model_cfg = dict(config["model"])
    for key in ("weights", "weights_path"):  # every weight is in model.pt: no download, no file needed
        if key in model_cfg:
            model_cfg[key] = None
    (out / "model.yaml").write_text(OmegaConf.to_yaml(model_cfg))
    (out / "config.yaml").write_text(OmegaConf.to_yaml(config))
    (out / "class_names.json").write_text(json.dumps({"class_names": class_names}, indent=2) + "\n")
    log.info("exported %s (%s) to %s", ckpt_path, ", ".join(formats), out)
    return out


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
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
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
        (got,) = session.run(["logits"], {"input": x.numpy()})
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
