"""A model's weights in a checkpoint: what is stored (lean for frozen blocks), loaded, and evaluated with.

Lean checkpoints: for a model with frozen blocks (`Backbone.frozen_identity()`), `model` holds only what training
changes and `frozen` names the rest (weights name or file and a content fingerprint); `restore_model` rebuilds
the frozen part from the model's own weights source and refuses a different one. What is checked is the frozen
part's identity, not whether it is frozen now: a checkpoint written before `model.unfreeze_at_epoch` loads into
the unfrozen model at the end of training. `checkpoint.save_frozen=true` stores everything.

This module is a leaf of `lab.models`: the checkpoint policy (`lab.checkpoint`) imports it, never the reverse.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lab.errors import UserError


def model_state(model: nn.Module, save_frozen: bool = False) -> dict[str, Any]:
    """The checkpoint's `model` and `frozen` entries: without `save_frozen`, frozen blocks are left out."""
    identity = None if save_frozen else getattr(model, "frozen_identity", lambda: None)()
    state = model.state_dict()
    if identity is not None:
        skip = set(model.frozen_keys())
        state = {key: value for key, value in state.items() if key not in skip}
    return {"model": state, "frozen": identity}


def restore_model(
    model: nn.Module, state: dict[str, Any], where: str, strict: bool = True, inference: bool = False
) -> None:
    """Load a checkpoint's weights into `model` (`inference`: the ones to evaluate with, see `inference_weights`);
    a lean checkpoint's frozen part is rebuilt from the model's weights source and must match it bit for bit."""
    weights = inference_weights(state) if inference else state["model"]
    saved = state.get("frozen")
    if saved is None:
        return load_model_state(model, weights, where, strict)
    left_out = [key for key in model.state_dict() if key not in state["model"]]
    rebuilt = (
        model.frozen_weights(left_out, saved["fingerprint"]) if hasattr(model, "frozen_weights") else None
    )
    if rebuilt is None:
        raise UserError(
            f"the checkpoint's frozen backbone is {describe(saved)} but this model's is {describe_model(model)}",
            where,
            "build the model with the checkpoint's model.weights / model.weights_path (and model.freeze), or "
            "use a checkpoint written with checkpoint.save_frozen=true or an exported model.pt",
        )
    load_model_state(model, {**rebuilt, **weights}, where, strict)


def describe_model(model: nn.Module) -> str:
    """The frozen part of `model` in a refusal, as its own log line states it."""
    if hasattr(model, "describe_frozen"):
        return model.describe_frozen(with_fingerprint=True)
    return f"{type(model).__name__} with nothing frozen"


def inference_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights that evaluation, predict and export use: a callback's (the EMA with `evaluate_with: ema`) that
    says so with `inference_weights: true`, else the trained weights `model` (what training resumes from).

    A callback stores only the tensors that train (the EMA leaves out frozen blocks): the rest are `model`'s.
    """
    for cb_state in (state.get("callbacks") or {}).values():
        if isinstance(cb_state, dict) and cb_state.get("inference_weights"):
            return {**state["model"], **cb_state["weights"]}
    return state["model"]


def load_model_state(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    where: str,
    strict: bool = True,
    frozen: set[str] = frozenset(),
) -> None:
    """`load_state_dict` with a readable list of missing/unexpected keys and shape mismatches.

    `frozen`: keys a lean state leaves out on purpose (the model already holds them).
    """
    own = model.state_dict()
    mismatched = [
        f"{key} {tuple(value.shape)}≠{tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and own[key].shape != value.shape
    ]
    missing = [key for key in own if key not in state_dict and key not in frozen]
    unexpected = [key for key in state_dict if key not in own]
    if mismatched or (strict and (missing or unexpected)):
        parts = []
        for label, keys in (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected)):
            if keys and (strict or label == "shape mismatch"):
                shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
                parts.append(f"{label}: {shown}")
        raise UserError(
            "checkpoint does not fit this model; " + "; ".join(parts),
            where,
            "use the same model and data (num_classes) as the checkpoint, or checkpoint.strict=false for a "
            "partial load",
        )
    if not strict or frozen:
        state_dict = {key: value for key, value in state_dict.items() if key in own}
    from lab.fsdp import is_sharded, load_full_state_dict

    if is_sharded(model):  # trainer.strategy=fsdp: each rank keeps its shards of the whole tensors
        return load_full_state_dict(model, state_dict, strict=strict and not frozen)
    model.load_state_dict(state_dict, strict=strict and not frozen)


def describe(identity: dict[str, Any]) -> str:
    """`resnet18 weights=DEFAULT (fingerprint 1a2b...)` for error messages."""
    source = f"weights_path={identity['weights_path']}" if identity.get("weights_path") else (
        f"weights={identity.get('weights')}")  # fmt: skip
    return f"{identity['name']} {source} (fingerprint {identity['fingerprint']})"
