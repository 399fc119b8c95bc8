"""A trained model with its edges: raw inputs in, predictions in the user's units out.

What lab applies between the raw data and the model (images: uint8 → /255 → (x - mean) / std; tables: z-scores
with the training split's statistics) and between the model's outputs and the predictions (softmax, sigmoid, a
regression target's standardisation undone) is one plain dict, the `preprocess` record of every checkpoint
(`record`). `RawInputModel` wraps a model with it: `predict.py`, the exported `model.yaml` + `model.pt` and
`model.onnx` all run this one module, so they give the same numbers for the same raw inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

#: How a task's outputs become predictions (`Task.output`).
OUTPUTS = ("softmax", "sigmoid", "identity")


def record(
    dataset: Mapping[str, Any], extra: Mapping[str, Any], task: Any, class_names: Sequence[str]
) -> dict:
    """The `preprocess` record of a run: `dataset` (its config), `extra` (`DataSplits.extra`: the training
    split's statistics and column names), `task` (its `output` and `threshold`)."""
    if "image_size" in dataset:  # images: what the model's input size and normalisation were
        size, channels = int(dataset["image_size"]), int(dataset["channels"])
        inputs = {"input": "image", "dtype": "uint8", "shape": [channels, size, size], "value_range": [0, 255],
                  "mean": [float(v) for v in dataset["mean"]], "std": [float(v) for v in dataset["std"]]}  # fmt: skip
    else:  # table rows: the feature columns in their order, standardised or not
        features = extra.get("standardize") or {}
        num_features = int(dataset.get("num_features") or len(features.get("mean", [])))
        inputs = {"input": "table", "dtype": "float32", "shape": [num_features],
                  "feature_names": extra.get("feature_names"),
                  "mean": features.get("mean"), "std": features.get("std")}  # fmt: skip
    targets = extra.get("standardize_targets") or {}
    output = {"output": task.output, "threshold": getattr(task, "threshold", None),
              "target_mean": targets.get("mean"), "target_std": targets.get("std")}  # fmt: skip
    if task.output == "identity":  # one column per target value
        size = len(targets.get("mean") or []) or 1
        output["names"] = list(extra.get("target_names") or (["value"] if size == 1 else range(size)))
    else:
        output["names"] = [str(c) for c in class_names]
    output["names"] = [str(n) for n in output["names"]]
    return {**inputs, **output}


def record_from_config(
    config: Mapping[str, Any], state: Mapping[str, Any], class_names: Sequence[str]
) -> dict:
    """The record of a checkpoint written before checkpoints held one: from its config and `standardize`."""
    from types import SimpleNamespace

    dataset = config["dataset"]
    kind = "softmax" if dataset.get("num_classes") else "identity"
    return record(
        dataset, {"standardize": state.get("standardize")}, SimpleNamespace(output=kind), class_names
    )


class RawInputModel(nn.Module):
    """`model` between its edges: raw inputs (see `record`) → predictions (probabilities, or target values).

    Its weights are the model's own: `state_dict`/`load_state_dict` are the wrapped model's, so `export/model.pt`
    loads into it and into the bare model alike. The record's statistics are constants (not in the state_dict).
    """

    def __init__(self, model: nn.Module, preprocess: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.preprocess = dict(preprocess)
        if self.preprocess["output"] not in OUTPUTS:
            raise ValueError(f"preprocess.output must be one of {OUTPUTS}, not {self.preprocess['output']!r}")
        image = self.preprocess["input"] == "image"
        view = (1, -1, 1, 1) if image else (1, -1)
        for name in ("mean", "std", "target_mean", "target_std"):
            values = self.preprocess.get(name)
            shape = view if name in ("mean", "std") else (1, -1)
            tensor = None if values is None else torch.tensor(list(values), dtype=torch.float32).view(shape)
            self.register_buffer(name, tensor, persistent=False)

    def inputs(self, x: Tensor) -> Tensor:
        """Raw inputs → what the model was trained on."""
        x = x.float()
        if self.preprocess["input"] == "image":
            x = x / 255.0
            channels = self.preprocess["shape"][0]
            if x.shape[1] != channels:  # a grayscale image for a 3-channel model
                x = x.expand(-1, channels, -1, -1)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    def predictions(self, outputs: Tensor) -> Tensor:
        """Model outputs → class probabilities, multi-label probabilities or values in the target's units."""
        outputs = outputs.float()
        kind = self.preprocess["output"]
        if kind == "softmax":
            return outputs.softmax(1)
        if kind == "sigmoid":
            return outputs.sigmoid()
        outputs = outputs.flatten(1) if outputs.ndim > 1 else outputs.unsqueeze(1)  # (N, targets)
        return outputs * self.target_std + self.target_mean if self.target_std is not None else outputs

    def forward(self, x: Tensor) -> Tensor:
        return self.predictions(self.model(self.inputs(x)))

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)


def labels(predictions: Tensor, preprocess: Mapping[str, Any]) -> list[str]:
    """The predicted label of each row: the likeliest class, the labels above the threshold joined by ';', or
    '' for regression (its values are the prediction)."""
    names, kind = preprocess["names"], preprocess["output"]
    if kind == "softmax":
        return [names[i] for i in predictions.argmax(1).tolist()]
    if kind == "sigmoid":
        above = predictions >= preprocess["threshold"]
        return [";".join(n for n, on in zip(names, row, strict=True) if on) for row in above.tolist()]
    return ["" for _ in range(len(predictions))]
