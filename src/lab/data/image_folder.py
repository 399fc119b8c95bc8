"""Your own images in torchvision's ImageFolder layout. → `conf/dataset/image_folder.yaml`

    root/<class>/*.jpg|png|...                          split into train/val/test (dataset.*_fraction)
    root/train/<class>/...  root/val/...  root/test/...  split folders, in any combination: those present are used
                                                        as they are, the missing ones are split off the training images

A folder named `train`, `val` or `test` right under `root` that holds class folders is a split, never a class; one
that holds images is a class like any other. Class names are the folder names (sorted). Splits are stratified and
placed by a hash of each file's path (`lab.data.split_indices`), so adding images moves at most one per class.

Before training every file is checked (`check_readable`: header, and a PNG's chunk checksums), an empty class folder
and a wrong `class_names` list are refused. Images are decoded, resized and cropped per sample (uint8, in DataLoader
workers: random resized crop + flip on train when `dataset.augment`), then normalised on the device by `Preprocess`.
A file that still fails to decode there is named in one line (`SampleError`). 16-bit images are scaled to 8 bits
(÷257); transparent pixels are composited on white (`BACKGROUND`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import Dataset

from lab.errors import UserError

SPLITS = ("train", "val", "test")
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on


def _folders(path: Path) -> list[str]:
    return sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))


def split_folders(root: Path) -> dict[str, Path]:
    """`root/train`, `root/val`, `root/test` that hold class folders (one holding images is a class)."""
    return {s: root / s for s in SPLITS if (root / s).is_dir() and _folders(root / s)}


def class_folders(root: str | Path | None) -> list[str]:
    """Sorted class folder names under `root/train` (when present) or `root`; [] when root is missing."""
    if not root or not Path(root).is_dir():
        return []
    root = Path(root)
    splits = split_folders(root)
    if "train" in splits:
        return _folders(splits["train"])
    return [name for name in _folders(root) if name not in splits]


def eval_transform(size: int) -> Any:
    """PIL image → uint8 (C, size, size): resize the short side, centre crop. Shared with `lab.predict`."""
    from torchvision.transforms import v2

    return v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])


def train_transform(size: int, scale: tuple[float, float]) -> Any:
    from torchvision.transforms import v2

    return v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, scale=scale, antialias=True),
                       v2.RandomHorizontalFlip()])  # fmt: skip


def open_image(path: str | Path, channels: int) -> Any:
    """A PIL image in "L" (channels 1) or "RGB": 16-bit scaled to 8-bit, transparency composited on BACKGROUND."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode.startswith("I"):  # 16-bit grayscale ("I;16", or "I" for some PNGs): 0..65535 → 0..255
            import numpy as np

            pixels = (np.asarray(image, dtype=np.float32) / 257).round().clip(0, 255)
            image = Image.fromarray(pixels.astype(np.uint8))  # 2-D uint8: mode "L"
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
            image = Image.alpha_composite(background, rgba)
        return image.convert("L" if channels == 1 else "RGB")


class ImageFiles(Dataset):
    """(path, label) pairs → (uint8 image tensor, label)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Any, channels: int) -> None:
        self.samples, self.transform, self.channels = samples, transform, channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from lab.data import SampleError

        path, label = self.samples[index]
        try:
            image = open_image(path, self.channels)
        except Exception as e:  # PIL raises OSError ("image file is truncated"), SyntaxError, ...
            raise SampleError(f"undecodable image ({type(e).__name__}: {str(e)[:100]})", path,
                              "delete or replace the file, or move it out of dataset.root") from None  # fmt: skip
        return self.transform(image), label


def _samples(folder: Path, classes: list[str], root: Path) -> list[tuple[str, int]]:
    extra = sorted(set(_folders(folder)) - set(classes) - ({*SPLITS} if folder == root else set()))
    if extra:
        raise UserError(f"class folders {extra} are not in the training classes {classes}", f"dataset.root={folder}",
                        "use the same class folders in train/, val/ and test/")  # fmt: skip
    return [
        (str(path), index)
        for index, name in enumerate(classes)
        if (folder / name).is_dir()
        for path in sorted((folder / name).rglob("*"))
        if path.suffix.lower() in EXTENSIONS and path.is_file()
    ]


def check_readable(samples: list[tuple[str, int]]) -> None:
    """Open each file (cheap: no decoding) and name the first one that is not an image, or a truncated PNG."""
    from PIL import Image

    for path, _ in samples:
        try:
            with Image.open(path) as image:
                image.verify()  # header, and a PNG's chunk checksums (a truncated PNG), without decoding
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise UserError(f"unreadable image ({type(e).__name__})", path,
                            "delete or replace the file, or move it out of dataset.root") from None  # fmt: skip


def build(cfg: DictConfig) -> Any:
    """`dataset.root` → `DataSplits` of `ImageFiles`; called by `lab.data.build_data` via `dataset.builder`."""
    from lab.data import DataSplits, Preprocess, check_class_names, check_sizes, fold_indices, split_indices

    if not cfg.root:
        raise UserError(
            "no image folder given", "dataset.root", "python train.py dataset=image_folder dataset.root=/path"
        )
    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise UserError(
            "image folder not found", f"dataset.root={root}", "give a folder of <class>/<image> files"
        )
    classes = class_folders(root)
    where = f"dataset.root={root}"
    if not classes:
        raise UserError(
            "no class folders in the image folder", where, "lay it out as root/<class>/<image files>"
        )
    if len(classes) == 1:
        raise UserError(f"only one class folder ({classes[0]})", where, "classification needs at least two")
    given = {split: _samples(folder, classes, root) for split, folder in split_folders(root).items()}
    pool = given.pop("train") if "train" in given else _samples(root, classes, root)
    if not pool:
        raise UserError(f"no images ({', '.join(EXTENSIONS)}) in the class folders", where, "add images")
    counts = [sum(label == index for _, label in pool) for index in range(len(classes))]
    if 0 in counts:
        empty = classes[counts.index(0)]
        raise UserError(f"class folder {empty!r} has no training images", where,
                        "add images to it, or remove the folder (a class without images cannot be learnt)")  # fmt: skip
    class_names = list(cfg.class_names or classes)
    check_class_names(class_names, len(classes))
    if cfg.check_images:
        check_readable([s for samples in (pool, *given.values()) for s in samples])
    missing = [split for split in ("test", "val") if split not in given]
    fractions = {"test": cfg.test_fraction, "val": cfg.val_fraction}
    parts = split_indices(len(pool), [fractions[s] for s in missing], cfg.split_seed, [label for _, label in pool],
                          [str(Path(path).relative_to(root)) for path, _ in pool])  # fmt: skip
    for split, indices in zip(missing, parts, strict=False):
        given[split] = [pool[i] for i in indices]
    pool = [pool[i] for i in parts[-1]]
    fold_positions = None
    if cfg.get("folds"):  # k-fold: the folds cut what train and val hold together
        both = [*pool, *given["val"]]
        val_idx, train_idx = fold_indices([], range(len(both)), cfg.folds, cfg.fold, cfg.split_seed,
                                          [label for _, label in both],
                                          [str(Path(path).relative_to(root)) for path, _ in both])  # fmt: skip
        given["val"], pool = [both[i] for i in val_idx], [both[i] for i in train_idx]
        fold_positions = (train_idx, val_idx)
    check_sizes({"train": len(pool), "val": len(given["val"]), "test": len(given["test"])}, str(root),
                "dataset.test_fraction, dataset.val_fraction")  # fmt: skip
    size, channels = int(cfg.image_size), int(cfg.channels)
    read_channels = 1 if channels == 1 else 3
    train_tf = train_transform(size, tuple(cfg.augment_scale)) if cfg.augment else eval_transform(size)
    return DataSplits(
        train=ImageFiles(pool, train_tf, read_channels),
        val=ImageFiles(given["val"], eval_transform(size), read_channels),
        test=ImageFiles(given["test"], eval_transform(size), read_channels),
        class_names=class_names,
        transform=Preprocess(size, channels, list(cfg.mean), list(cfg.std)),
        extra={"augmented": bool(cfg.augment)},
        fold_positions=fold_positions,
    )
