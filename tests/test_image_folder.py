"""`dataset=image_folder` on temporary folders of generated PNGs: layouts, splits, errors, cached features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, train
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lab.data import build_data, build_loaders
from lab.errors import UserError

COLOURS = {"cat": (220, 40, 40), "dog": (40, 40, 220), "fox": (40, 200, 40)}


def make_images(root: Path, per_class: int = 10, classes: tuple[str, ...] = ("cat", "dog", "fox")) -> Path:
    """Noisy images whose dominant colour is the class: learnable in a few steps."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(
                rng.normal(COLOURS.get(name, (128, 128, 128)), 40, size=(20 + i, 24, 3)), 0, 255
            ).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def image_folder_config(root: Path, tmp_path: Path, *overrides: str):
    return compose_config(["dataset=image_folder", f"dataset.root={root}", "dataset.image_size=16", "dataset.num_workers=0",
                           *overrides], tmp_path)  # fmt: skip


def test_seeded_split_of_one_folder(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images")
    cfg = image_folder_config(root, tmp_path)
    assert cfg.dataset.num_classes == 3  # counted from the class folders
    splits = build_data(cfg.dataset)
    assert splits.class_names == ["cat", "dog", "fox"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 3, 3)
    paths = [p for split in (splits.train, splits.val, splits.test) for p, _ in split.samples]
    assert len(set(paths)) == 30  # disjoint
    assert [p for p, _ in build_data(cfg.dataset).test.samples] == [
        p for p, _ in splits.test.samples
    ]  # seeded
    x, y = next(iter(build_loaders(splits, cfg.dataset, torch.device("cpu"), seed=0)["train"]))
    assert x.shape == (len(x), 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long


def test_train_val_test_sub_folders_and_augmentation(tmp_path: Path) -> None:
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        make_images(tmp_path / "images" / split, per_class=n, classes=("cat", "dog"))
    cfg = image_folder_config(tmp_path / "images", tmp_path, "dataset.augment=true")
    splits = build_data(cfg.dataset)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (
        12,
        4,
        6,
    ) and cfg.dataset.num_classes == 2
    assert splits.extra["augmented"]
    torch.manual_seed(0)
    a, b = splits.train[0][0], splits.train[0][0]
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8 and not torch.equal(a, b)  # random crop/flip
    assert torch.equal(splits.val[0][0], splits.val[0][0])  # evaluation: no randomness


def test_image_folder_errors_name_the_problem(tmp_path: Path) -> None:
    def error(root: Path | None) -> str:
        with pytest.raises(UserError) as e:
            build_data(image_folder_config(root, tmp_path).dataset if root else compose_config(
                ["dataset=image_folder"], tmp_path).dataset)  # fmt: skip
        return e.value.line()

    assert "dataset.root" in error(None)
    assert "not found" in error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no class folders" in error(tmp_path / "empty")
    assert "only one class" in error(make_images(tmp_path / "one", 2, ("cat",)))
    (tmp_path / "no_images" / "a").mkdir(parents=True)
    (tmp_path / "no_images" / "b").mkdir()
    assert "no images" in error(tmp_path / "no_images")
    root = make_images(tmp_path / "bad", 2, ("cat", "dog"))
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    line = error(root)
    assert "unreadable image" in line and str(root / "dog" / "broken.png") in line


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    proc = train(
        tmp_path / "run", "dataset=image_folder", f"dataset.root={tmp_path / 'nowhere'}", check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: image folder not found (dataset.root=")
    assert "Traceback" not in proc.stderr


def test_cached_features_train_the_same_head_as_uncached(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images")
    args = ["dataset=image_folder", f"dataset.root={root}", "dataset.num_workers=0", "dataset.batch_size=8",
            "model=resnet18_frozen", "model.weights=null", "dataset.image_size=32", "trainer.max_epochs=2",
            "model.dropout=0.2", "test=false", f"paths.feature_cache={tmp_path / 'features'}"]  # fmt: skip
    cached = train(tmp_path / "cached", *args, "model.cache_features=auto", "monitor=full")
    assert "cached backbone features" in cached.stderr + cached.stdout
    plain = train(tmp_path / "plain", *args, "model.cache_features=false")
    assert "cached backbone features" not in plain.stderr + plain.stdout
    a = torch.load(tmp_path / "cached/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "plain/checkpoints/last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys() and any(k.startswith("features.") for k in a["model"])
    for key in a["model"]:  # the full model is saved either way; the head trained identically
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5)
    best = torch.load(tmp_path / "cached/checkpoints/best.pt", weights_only=True)
    assert a["global_step"] == 6 and best["class_names"] == ["cat", "dog", "fox"]

    # Every monitor part that works on feature vectors still ran; those that need pictures were left out.
    acc = EventAccumulator(str(tmp_path / "cached/tensorboard"), size_guidance={"images": 0}).Reload()
    assert not acc.Tags()["graph"] and "train/images" not in acc.Tags()["images"]
    assert "val/confusion_matrix" in acc.Tags()["images"] and "val/pr_curve/cat" in acc.PluginTagToContent(
        "pr_curves"
    )
    projector = next((tmp_path / "cached/tensorboard").rglob("tensors.tsv")).read_text().splitlines()
    assert len(projector[0].split("\t")) == 512  # resnet18's penultimate features, straight from the cache


def files(splits) -> dict[str, list[str]]:
    return {s: [p for p, _ in getattr(splits, s).samples] for s in ("train", "val", "test")}


def test_split_folders_in_any_combination_are_never_classes(tmp_path: Path) -> None:
    root = make_images(tmp_path / "a", per_class=10, classes=("cat", "dog"))  # class folders ...
    make_images(root / "test", per_class=3, classes=("cat", "dog"))  # ... and a test/ folder beside them
    splits = build_data(image_folder_config(root, tmp_path).dataset)
    assert (
        splits.class_names == ["cat", "dog"] and image_folder_config(root, tmp_path).dataset.num_classes == 2
    )
    found = files(splits)
    assert all("/test/" in p for p in found["test"]) and len(found["test"]) == 6
    assert not any("/test/" in p for p in found["train"] + found["val"])
    every = [p for split in found.values() for p in split]
    assert len(every) == len(set(every)) == 26  # no file is in two splits

    root = tmp_path / "b"  # train/ and val/, the test split taken off train/; classes named val and test
    make_images(root / "train", per_class=10, classes=("cat", "dog"))
    make_images(root / "val", per_class=2, classes=("cat", "dog"))
    for name in ("val", "test"):
        (root / "train" / name).mkdir()
        for i in range(10):
            (root / "train" / name / f"{i}.png").write_bytes(
                (root / "train" / "cat" / f"{i}.png").read_bytes()
            )
    splits = build_data(image_folder_config(root, tmp_path).dataset)
    assert splits.class_names == ["cat", "dog", "test", "val"]
    found = files(splits)
    assert len(found["val"]) == 4 and all(p.startswith(str(root / "val")) for p in found["val"])
    assert sorted(p.split("/")[-2] for p in found["test"]) == ["cat", "dog", "test", "val"]  # stratified
    every = [p for split in found.values() for p in split]
    assert len(every) == len(set(every)) == 44
    assert all(p.startswith(str(root / "train")) for p in found["train"] + found["test"])

    root = make_images(tmp_path / "c", per_class=4, classes=("cat", "test"))  # a folder of images named test
    assert build_data(image_folder_config(root, tmp_path).dataset).class_names == ["cat", "test"]


def test_splits_are_stratified_and_stable_as_images_are_added(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=20)
    before = files(build_data(image_folder_config(root, tmp_path).dataset))
    for name in COLOURS:  # every class in the test split, in proportion
        assert sum(f"/{name}/" in p for p in before["test"]) == 2
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / "cat" / "new.png")
    after = files(build_data(image_folder_config(root, tmp_path).dataset))
    moved = sum(len(set(before[s]) - set(after[s])) for s in before)
    assert moved <= 1  # adding one image moves at most one other (it moved 5 of 6 test files before)


def test_empty_class_folder_class_names_truncated_and_converted_images(tmp_path: Path) -> None:
    from lab.data import SampleError
    from lab.data.image_folder import open_image

    root = make_images(tmp_path / "images", per_class=6)
    (root / "empty").mkdir()
    with pytest.raises(UserError, match="class folder 'empty' has no training images"):
        build_data(image_folder_config(root, tmp_path).dataset)
    (root / "empty").rmdir()
    with pytest.raises(UserError, match="2 class names for 3 classes"):
        build_data(image_folder_config(root, tmp_path, "dataset.class_names=[a,b]").dataset)

    data = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "0.png").write_bytes(data[: len(data) // 2])  # a truncated PNG: found at scan time
    with pytest.raises(UserError) as e:
        build_data(image_folder_config(root, tmp_path).dataset)
    assert str(root / "dog" / "0.png") in e.value.line() and "\n" not in e.value.line()
    (root / "dog" / "0.png").write_bytes(data)

    jpeg = root / "fox" / "0.jpg"  # a truncated JPEG passes the scan: named from the DataLoader worker
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    cfg = image_folder_config(root, tmp_path, "dataset.num_workers=1", "dataset.test_fraction=0.5")
    splits = build_data(cfg.dataset)
    stage = next(
        s for s in ("train", "val", "test") if str(jpeg) in [p for p, _ in getattr(splits, s).samples]
    )
    with pytest.raises(SampleError) as e:
        for _ in build_loaders(splits, cfg.dataset, torch.device("cpu"), seed=0)[stage]:
            pass
    assert e.value.line().startswith("error: undecodable image") and str(jpeg) in e.value.line()
    assert "\n" not in e.value.line() and "Traceback" not in e.value.line()

    sixteen = tmp_path / "deep.png"  # 16-bit grayscale: scaled to 8 bits, not saturated
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(sixteen)
    assert np.asarray(open_image(sixteen, 3))[0, 0].tolist() == [128, 128, 128]
    rgba = tmp_path / "alpha.png"  # transparent pixels: composited on white
    pixels = np.zeros((4, 4, 4), np.uint8)
    pixels[..., 0], pixels[:2, :, 3] = 255, 255  # red; the top half opaque, the bottom transparent
    Image.fromarray(pixels, "RGBA").save(rgba)
    image = np.asarray(open_image(rgba, 3))
    assert image[0, 0].tolist() == [255, 0, 0] and image[3, 0].tolist() == [255, 255, 255]
