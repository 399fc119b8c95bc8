"""Any torchvision classification model as a pretrained backbone with a new head. → `conf/model/<name>*.yaml`

`Backbone(name=...)` builds `torchvision.models.get_model(name)`, loads `weights` (a torchvision weights name such
as DEFAULT) or `weights_path` (a local state_dict), swaps the model's last `nn.Linear` for `nn.Identity` (so
`.features` maps images to the penultimate vector) and puts a new `.head` on top for `num_classes`.

Freezing: `freeze: true` freezes the whole backbone, `freeze: N` its first N blocks (top-level children of the
torchvision model that have parameters, `nn.Sequential` containers opened up). Frozen parameters get
`requires_grad=False` and are left out of `param_groups()`, so the optimizer never sees them; frozen blocks stay in
eval mode during training (BatchNorm running stats and dropout untouched); a fully frozen backbone runs under
`torch.no_grad()`. `unfreeze_at_epoch: N` trains the head alone for N epochs, then the callback
`lab.callbacks.unfreeze.UnfreezeBackbone` (added by `conf/model/backbone/base.yaml`) calls `unfreeze()`; the
backbone's group (lr × `backbone_lr_scale`) is in the optimizer from the start.

torchvision is imported inside the functions: the default digits run never loads it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lab.errors import UserError

log = logging.getLogger(__name__)


def get_weights(name: str, weights: str | None) -> Any:
    """The torchvision weights enum member `weights` of model `name` (DEFAULT when None, for its metadata)."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(name)
    except (ValueError, KeyError):
        raise UserError(f"unknown torchvision model {name!r}", "model.name", _model_names_hint()) from None
    try:
        return enum.DEFAULT if weights in (None, "DEFAULT") else enum[str(weights)]
    except KeyError:
        allowed = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))
        raise UserError(
            f"unknown weights {weights!r} for {name}", "model.weights", f"use one of {allowed} or null"
        ) from None


def _model_names_hint() -> str:
    import torchvision.models

    names = torchvision.models.list_models(module=torchvision.models)  # classification models only
    return f"use a torchvision classification model, e.g. {', '.join(sorted(names)[:12])}, ..."


def weights_meta(name: str, weights: str | None, key: str) -> Any:
    """Preprocessing of the weights (`crop_size`, `mean`, `std`): the `${weights_meta:...}` config resolver."""
    transforms = get_weights(name, weights).transforms()
    value = getattr(transforms, key)
    return value[0] if key in ("crop_size", "resize_size") else list(value)


def _download_error(name: str, weights: str | None, error: Exception) -> UserError:
    from torch.hub import get_dir

    meta = get_weights(name, weights)
    wanted = Path(get_dir()) / "checkpoints" / os.path.basename(meta.url)
    return UserError(
        f"could not get the pretrained weights {name}/{weights} ({type(error).__name__}: {str(error)[:120]}); "
        f"torchvision wanted {wanted} (under TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')})",
        "model.weights",
        f"copy {os.path.basename(meta.url)} from {meta.url} there, or use model.weights=null (random init) "
        "or model.weights_path=<a local state_dict file>",
    )


def _last_linear(net: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """The parent, attribute name and module of the classifier: the last `nn.Linear` in the network."""
    found = None
    for parent in net.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found = (parent, attr, child)
    if found is None:
        raise UserError("the model has no nn.Linear classifier to replace", "model.name", "")
    return found


def blocks(net: nn.Module) -> list[nn.Module]:
    """The units `freeze: N` counts: top-level children with parameters, `nn.Sequential` opened one level."""
    units: list[nn.Module] = []
    for child in net.children():
        parts = list(child.children()) if isinstance(child, nn.Sequential) else [child]
        units += [p for p in parts if any(True for _ in p.parameters())]
    return units


class Backbone(nn.Module):
    def __init__(
        self,
        name: str,
        num_classes: int,
        weights: str | None = "DEFAULT",
        weights_path: str | None = None,
        freeze: bool | int = False,
        unfreeze_at_epoch: int | None = None,
        backbone_lr_scale: float = 1.0,
        hidden: int | None = None,
        dropout: float = 0.0,
        cache_features: bool | str = "auto",
    ) -> None:
        super().__init__()
        self.name, self.weights, self.weights_path = name, weights, weights_path
        self.features = self._build(name, weights, weights_path)
        parent, attr, classifier = _last_linear(self.features)
        setattr(parent, attr, nn.Identity())
        width = classifier.in_features
        layers: list[nn.Module] = []
        if hidden:
            layers += [nn.Dropout(dropout), nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        self.head = nn.Sequential(*layers, nn.Dropout(dropout), nn.Linear(width, num_classes))

        units = blocks(self.features)
        if isinstance(freeze, bool):
            count = len(units) if freeze else 0
        elif isinstance(freeze, int) and 0 <= freeze <= len(units):
            count = freeze
        else:
            raise UserError(
                f"must be true, false or a block count 0..{len(units)}, got {freeze!r}", "model.freeze"
            )
        if unfreeze_at_epoch is not None and (
            not isinstance(unfreeze_at_epoch, int) or unfreeze_at_epoch < 0
        ):
            raise UserError(
                f"must be null or an epoch >= 0, got {unfreeze_at_epoch!r}", "model.unfreeze_at_epoch"
            )
        if str(cache_features) not in ("auto", "True", "False"):
            raise UserError(
                f"unknown value {cache_features!r}", "model.cache_features", "use auto, true or false"
            )
        self.frozen = units[:count]
        # Tensors outside every block (ViT's class token) sit at the input: frozen with the first block.
        in_blocks = {id(p) for unit in units for p in unit.parameters()}
        loose = [p for p in self.features.parameters() if id(p) not in in_blocks]
        self.frozen_loose = loose if count else []
        for unit in self.frozen:
            unit.requires_grad_(False)
        for param in self.frozen_loose:
            param.requires_grad_(False)
        self.blocks_total = len(units)
        self.unfreeze_at_epoch = unfreeze_at_epoch if self.frozen else None
        self.backbone_lr_scale = float(backbone_lr_scale)
        self.cache_features = cache_features
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        log.info("%s, %s of %s parameters trainable", self.describe_frozen(), f"{trainable:,}", f"{total:,}")

    def describe_frozen(self, with_fingerprint: bool = False) -> str:
        """`resnet18 weights=DEFAULT: 10 of 10 blocks frozen`: what the log and every refusal say of the model."""
        source = f"weights_path={self.weights_path}" if self.weights_path else (
            f"weights={self.weights}" if self.weights is not None else "weights=null (random)")  # fmt: skip
        count = len(self.frozen)
        frozen = f"{count} of {self.blocks_total} blocks frozen" if count else "nothing frozen"
        identity = self.frozen_identity() if with_fingerprint else None
        return f"{self.name} {source}: {frozen}" + (
            f" (fingerprint {identity['fingerprint']})" if identity else ""
        )

    @staticmethod
    def _build(name: str, weights: str | None, weights_path: str | None) -> nn.Module:
        from torchvision.models import get_model

        if weights_path:
            net = get_model(name, weights=None)
            path = Path(str(weights_path))
            if not path.is_file():
                raise UserError("weights file not found", f"model.weights_path={path}",
                                "give a state_dict file; a lean checkpoint (the default) rebuilds its frozen "
                                "backbone from this file: put it back, or use the model.pt of export.py, "
                                "which stands alone")  # fmt: skip
            state = torch.load(path, map_location="cpu", weights_only=True)
            from lab.models.weights import load_model_state

            load_model_state(net, state.get("state_dict", state), f"model.weights_path={path}")
            return net
        if weights is None:
            return get_model(name, weights=None)
        meta = get_weights(name, weights)
        try:
            return get_model(name, weights=meta)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a corrupt download a RuntimeError
            raise _download_error(name, weights, e) from None

    @property
    def fully_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.features.parameters())

    def can_cache_features(self) -> bool:
        """Backbone outputs never change during training: fully frozen and never unfrozen."""
        return self.fully_frozen and self.unfreeze_at_epoch is None

    def forward(self, x: Tensor) -> Tensor:
        if not self.fully_frozen:
            return self.head(self.features(x))
        with torch.no_grad():  # no autograd graph through the frozen backbone
            features = self.features(x)
        return self.head(features)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        for unit in [self.features] if self.fully_frozen else self.frozen:
            unit.eval()  # frozen BatchNorm keeps its running stats, frozen dropout stays off
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        """Head, and the backbone's parameters that train (now, or after `unfreeze_at_epoch`) with its own lr scale.

        Blocks frozen for good are left out, so the optimizer never sees them; blocks to be unfrozen later are in
        from the start and get no gradient until then (see `lab.optim.build_optimizer`).
        """
        later = self.unfreeze_at_epoch is not None
        backbone = [p for p in self.features.parameters() if p.requires_grad or later]
        groups = [{"params": list(self.head.parameters()), "name": "head"}]
        if backbone:
            groups.append({"params": backbone, "name": "backbone", "lr_scale": self.backbone_lr_scale})
        return groups

    def unfreeze(self) -> int:
        """Let the frozen blocks train (`lab.callbacks.unfreeze.UnfreezeBackbone`); returns the parameter count."""
        freed = sum(p.numel() for unit in self.frozen for p in unit.parameters())
        freed += sum(p.numel() for p in self.frozen_loose)
        for unit in self.frozen:
            unit.requires_grad_(True)
        for param in self.frozen_loose:
            param.requires_grad_(True)
        self.frozen, self.frozen_loose = [], []
        self.train(self.training)
        return freed

    def frozen_keys(self) -> list[str]:
        """state_dict keys of the frozen blocks: parameters and buffers that training never changes."""
        frozen = {id(t) for unit in self.frozen for t in (*unit.parameters(), *unit.buffers())}
        frozen |= {id(t) for t in self.frozen_loose}
        return [key for key, t in self.state_dict(keep_vars=True).items() if id(t) in frozen]

    def frozen_identity(self) -> dict[str, Any] | None:
        """What rebuilds the frozen part without storing it: the weights' name or file, and a content fingerprint.

        None while nothing is frozen, and for random weights (weights=null): those have no name to rebuild them
        from, so a checkpoint stores them. The fingerprint is computed once (VGG19: about a second) and kept.
        """
        keys = self.frozen_keys()
        if not keys or (self.weights is None and not self.weights_path):
            return None
        if getattr(self, "_identity", None) is None or self._identity["keys"] != len(keys):
            state = self.state_dict()
            self._identity = {
                "name": self.name,
                "weights": None if self.weights_path else self.weights,
                "weights_path": str(self.weights_path) if self.weights_path else None,
                "fingerprint": fingerprint({key: state[key] for key in keys}),
                "keys": len(keys),
            }
        return dict(self._identity)

    def frozen_weights(self, keys: list[str], expected: str) -> dict[str, Tensor] | None:
        """The tensors `keys` of a lean checkpoint's frozen part, whose fingerprint was `expected`; None when this
        model's weights source gives other ones.

        While the same blocks are frozen they are the model's own; after `unfreeze()` (they have trained since),
        or with another freeze, they are rebuilt from `weights`/`weights_path`. Random weights have no source.
        """
        own = self.frozen_identity()
        state = self.state_dict()
        if own is not None and own["fingerprint"] == expected and set(keys) == set(self.frozen_keys()):
            return {key: state[key] for key in keys}
        if self.weights is None and not self.weights_path:
            return None
        source = {f"features.{k}": v for k, v in self._build(self.name, self.weights, self.weights_path)
                  .state_dict().items()}  # fmt: skip
        if not keys or any(key not in source for key in keys):
            return None
        rebuilt = {key: source[key] for key in keys}
        return rebuilt if fingerprint(rebuilt) == expected else None

    def features_fingerprint(self) -> str:
        """Fingerprint of the whole backbone (`features`), e.g. to key cached features on disk."""
        return fingerprint({k: v for k, v in self.state_dict().items() if k.startswith("features.")})


def fingerprint(tensors: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: equal exactly when the tensors are bit-identical."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            digest.update(t.view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:16]
