"""Torchvision backbones (weights=null or a saved state_dict: no downloads here): build, freeze, unfreeze, lr."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from conftest import CONF, FEW_IMAGES, TINY, compose_config, train
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from lab.errors import UserError
from lab.models.backbone import Backbone
from lab.optim import build_optimizer

BACKBONES = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if "backbone/" in p.read_text())


def test_every_backbone_config_builds_and_forwards(tmp_path: Path) -> None:
    """Built and run on the meta device: shapes and parameter flags exactly as on the CPU, without drawing the
    random weights of VGG-19 and ResNet-50 (seconds each)."""
    assert {"vgg19", "vgg19_frozen", "resnet18", "resnet18_frozen", "resnet50_frozen", "efficientnet_b0_frozen",
            "mobilenet_v3_small_frozen", "convnext_tiny_frozen"} <= set(BACKBONES)  # fmt: skip
    x = torch.rand(2, 3, 32, 32, device="meta")  # tiny inputs: every one of these architectures accepts 32x32
    for option in BACKBONES:
        cfg = compose_config([f"model={option}", "model.weights=null"], tmp_path)
        assert cfg.dataset.channels == 3 and cfg.dataset.image_size == 224  # the weights' own preprocessing
        assert list(cfg.dataset.mean) == pytest.approx([0.485, 0.456, 0.406])
        with torch.device("meta"):
            model = instantiate(cfg.model).eval()
        assert model(x).shape == (2, cfg.dataset.num_classes), option
        assert model.head(model.features(x)).shape == (2, cfg.dataset.num_classes)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        in_optimizer = {
            id(p) for g in build_optimizer(cfg.optimizer, model).param_groups for p in g["params"]
        }
        assert in_optimizer == trainable
        if option.endswith("_frozen"):
            assert trainable == {id(p) for p in model.head.parameters()}, option
        else:
            assert trainable == {id(p) for p in model.parameters()}, option
        del model


def test_data_image_size_override_wins(tmp_path: Path) -> None:
    cfg = compose_config(["model=resnet18_frozen", "dataset.image_size=64"], tmp_path)
    assert cfg.dataset.image_size == 64 and cfg.dataset.channels == 3
    assert (
        compose_config(["model=resnet50_frozen", "model.weights=IMAGENET1K_V2"], tmp_path).dataset.image_size
        == 224
    )


def test_frozen_step_changes_only_the_head() -> None:
    torch.manual_seed(0)
    model = Backbone("resnet18", num_classes=3, weights=None, freeze=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(compose_config().optimizer, model)
    assert [g["name"] for g in optimizer.param_groups] == ["head"]
    grad_enabled = []
    model.features.register_forward_hook(lambda m, i, o: grad_enabled.append(torch.is_grad_enabled()))
    model.train()
    assert model.head.training and not model.features.training  # frozen BatchNorm stays in eval mode
    assert not any(m.training for m in model.features.modules())
    loss = nn.functional.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    assert grad_enabled == [False]  # the frozen backbone ran without an autograd graph
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith("features."):  # weights and BatchNorm running stats, bit for bit
            assert torch.equal(value, after[key]), key
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])


def test_freeze_leading_blocks_and_lr_scale() -> None:
    model = Backbone("resnet18", num_classes=2, weights=None, freeze=2, backbone_lr_scale=0.1, hidden=16)
    assert not any(
        p.requires_grad for p in [*model.features.conv1.parameters(), *model.features.bn1.parameters()]
    )
    assert all(p.requires_grad for p in model.features.layer1.parameters())
    model.train()
    assert not model.features.bn1.training and model.features.layer1.training
    optimizer = build_optimizer(compose_config(["optimizer.lr=0.01"]).optimizer, model)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
        {"head": 0.01, "backbone": 0.001}
    )
    with pytest.raises(UserError, match=r"model\.freeze"):
        Backbone("resnet18", num_classes=2, weights=None, freeze=99)


def test_weights_path_loads_a_saved_state_dict(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.get_model("resnet18", weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    torch.manual_seed(2)  # a different random init, overwritten by the file
    model = Backbone(
        "resnet18", num_classes=5, weights="DEFAULT", weights_path=str(tmp_path / "resnet18.pth")
    )
    x = torch.rand(2, 3, 32, 32)
    reference.fc = nn.Identity()
    with torch.no_grad():
        assert torch.equal(model.eval().features(x), reference(x))
    with pytest.raises(UserError, match=r"model\.weights_path"):
        Backbone("resnet18", num_classes=5, weights_path=str(tmp_path / "missing.pth"))


def test_offline_without_cached_weights_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No internet here, and a test must not depend on it: the download itself is what we replace.
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("torch.hub.urlopen", offline)
    with pytest.raises(UserError) as error:
        Backbone("resnet18", num_classes=2, weights="DEFAULT")
    line = error.value.line()
    assert (
        "TORCH_HOME" in line
        and str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in line
    )
    assert "model.weights=null" in line and "model.weights_path=" in line
    with pytest.raises(UserError, match="unknown weights"):
        Backbone("resnet18", num_classes=2, weights="NOPE")


def test_unfreeze_at_epoch_then_resume_after_unfreezing(tmp_path: Path) -> None:
    # The backbone runs on every batch here, nothing is cached.
    args = [*FEW_IMAGES, "model=mobilenet_v3_small_frozen", "model.weights=null", "dataset.image_size=16", "model.unfreeze_at_epoch=2",
            "model.backbone_lr_scale=0.1", "scheduler=cosine", "test=false", "trainer.limit_val_batches=1", "logger=none", "monitor=none", *TINY]  # fmt: skip

    def backbone(state: dict) -> dict:
        return {k: v for k, v in state["model"].items() if k.startswith("features.")}

    train(tmp_path / "a", *args, "trainer.max_epochs=1")
    first = torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=True)
    # The backbone's group is in the optimizer from the start (lr x backbone_lr_scale), without gradients while
    # frozen: no optimizer state for it yet.
    groups = first["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["head", "backbone"]
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.1)
    assert set(first["optimizer"]["state"]) == set(groups[0]["params"])
    # Epoch 2 still trains the head alone; then the backbone unfreezes (before that epoch's checkpoint).
    train(tmp_path / "b", *args, "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'a/checkpoints/last.pt'}")
    second = torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=True)
    assert "backbone unfrozen" in (tmp_path / "b" / "train.log").read_text()
    assert all(torch.equal(v, backbone(second)[k]) for k, v in backbone(first).items())
    # Resume from a checkpoint taken after unfreezing: epoch 3 trains the backbone too.
    train(tmp_path / "c", *args, "trainer.max_epochs=3", f"ckpt_path={tmp_path / 'b/checkpoints/last.pt'}")
    third = torch.load(tmp_path / "c/checkpoints/last.pt", weights_only=True)
    assert third["epoch"] == 3 and len(third["optimizer"]["param_groups"]) == 2
    changed = [k for k, v in backbone(second).items() if not torch.equal(v, backbone(third)[k])]
    assert any(k.endswith("weight") for k in changed) and any("running_mean" in k for k in changed)


def test_model_config_error_is_one_line_on_the_cli(tmp_path: Path) -> None:
    proc = train(tmp_path / "run", "model=mobilenet_v3_small_frozen", "model.weights=null", "model.freeze=999",
                     "dataset.image_size=32", check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: must be true, false or a block count 0..")
    # A UserError raised while resolving the config (${weights_meta:...}) is one line too.
    proc = train(tmp_path / "run2", "model=resnet18_frozen", "model.weights=NOPE", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: unknown weights 'NOPE' for resnet18 (model.weights): use one of DEFAULT, IMAGENET1K_V1 or null"
    )


def test_every_model_config_resolves_as_cfg_job_resolve_does(tmp_path: Path) -> None:
    """`--cfg job --resolve` runs `OmegaConf.resolve`, which rejects plain lists from resolvers."""
    from omegaconf import OmegaConf

    for option in sorted(p.stem for p in (CONF / "model").glob("*.yaml")):
        cfg = compose_config([f"model={option}"], tmp_path)
        OmegaConf.resolve(cfg)
        assert len(cfg.dataset.mean) == cfg.dataset.channels, option
    proc = train(None, "model=vgg19_frozen", "--cfg", "job", "--resolve")
    assert "mean:\n  - 0.485" in proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.parametrize("option", [*BACKBONES, "vit_b_16"])
def test_freezing_freezes_every_tensor_not_trained_and_the_log_says_so(option: str, caplog) -> None:
    """Every shipped backbone family (and ViT, whose class token sits outside every block), built on the meta
    device: no weights are drawn or downloaded, and the parameters' flags are exactly as built."""
    name = OmegaConf.load(CONF / "model" / f"{option}.yaml").model.name if option in BACKBONES else option
    caplog.set_level("INFO", logger="lab.models.backbone")
    with torch.device("meta"):
        frozen = Backbone(name, num_classes=3, weights=None, freeze=True)
        free = Backbone(name, num_classes=3, weights=None, freeze=False)
    total = len(frozen.frozen)
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    assert frozen.fully_frozen and frozen.can_cache_features()  # so: no autograd graph, features cached
    assert [g["name"] for g in frozen.param_groups()] == ["head"]
    assert all(p.requires_grad for p in free.parameters()) and free.frozen == []
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith(f"{name} weights=null (random): {total} of {total} blocks frozen, ")
    assert lines[1].startswith(f"{name} weights=null (random): nothing frozen, ")
    # The refusal to load a lean checkpoint says of the model what its log line said.
    assert frozen.describe_frozen(with_fingerprint=True) == lines[0].split(",")[0]
    if name == "vit_b_16":
        assert not frozen.features.class_token.requires_grad
        assert not frozen.features.encoder.pos_embedding.requires_grad
        free.unfreeze()  # nothing frozen: nothing to do
        frozen.unfreeze()
        assert frozen.features.class_token.requires_grad and not frozen.fully_frozen
