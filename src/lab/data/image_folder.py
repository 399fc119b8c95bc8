"""Your own images in torchvision's ImageFolder layout. → `conf/dataset/image_folder.yaml`

    root/<class>/*.jpg|png|...                       seeded split into train/val/test (data.*_fraction)
    root/train/<class>/...  [root/val/...]  [root/test/...]   the sub-folders given are used as they are

Class names are the folder names (sorted). Every image's header is opened once up front so that an unreadable file
is reported by name before training. Images are decoded, resized and cropped per sample (uint8, in DataLoader
workers: random resized crop + flip on train when `dataset.augment`), then normalised on the device by `Preprocess`.
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


def class_folders(root: str | Path | None) -> list[str]:
    """Sorted class folder names under `root/train` (when present) or `root`; [] when root is missing."""
    if not root or not Path(root).is_dir():
        return []
    base = Path(root) / "train" if (Path(root) / "train").is_dir() else Path(root)
    return sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))


def eval_transform(size: int) -> Any:
    """PIL image → uint8 (C, size, size): resize the short side, centre crop. Shared with `lab.predict`."""
    from torchvision.transforms import v2

    return v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])


def train_transform(size: int, scale: tuple[float, float]) -> Any:
    from torchvision.transforms import v2

    return v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, scale=scale, antialias=True),
                       v2.RandomHorizontalFlip()])  # fmt: skip


def open_image(path: str | Path, channels: int) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("L" if channels == 1 else "RGB")


class ImageFiles(Dataset):
    """(path, label) pairs → (uint8 image tensor, label)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Any, channels: int) -> None:
        self.samples, self.transform, self.channels = samples, transform, channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return self.transform(open_image(path, self.channels)), label


def _samples(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    extra = sorted(set(found) - set(classes))
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
    """Open each file's header (cheap: no decoding) and name the first one that is not an image."""
    from PIL import Image

    for path, _ in samples:
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise UserError(f"unreadable image ({type(e).__name__})", path,
                            "delete or replace the file, or move it out of dataset.root") from None  # fmt: skip


def build(cfg: DictConfig) -> Any:
    """`dataset.root` → `DataSplits` of `ImageFiles`; called by `lab.data.build_data` via `dataset.builder`."""
    from lab.data import DataSplits, Preprocess, _split

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
    given = {s: _samples(root / s, classes) for s in SPLITS if (root / s).is_dir()}
    pool = given["train"] if "train" in given else _samples(root, classes)
    if not pool:
        raise UserError(f"no images ({', '.join(EXTENSIONS)}) in the class folders", where, "add images")
    if cfg.check_images:
        check_readable([s for samples in (pool, *given.values()) for s in samples])
    if "test" not in given:
        test_idx, pool_idx = _split(len(pool), [cfg.test_fraction], cfg.split_seed)
        given["test"], pool = [pool[i] for i in test_idx], [pool[i] for i in pool_idx]
    if "val" not in given:
        val_idx, pool_idx = _split(len(pool), [cfg.val_fraction], cfg.split_seed)
        given["val"], pool = [pool[i] for i in val_idx], [pool[i] for i in pool_idx]
    size, channels = int(cfg.image_size), int(cfg.channels)
    read_channels = 1 if channels == 1 else 3
    train_tf = train_transform(size, tuple(cfg.augment_scale)) if cfg.augment else eval_transform(size)
    return DataSplits(
        train=ImageFiles(pool, train_tf, read_channels),
        val=ImageFiles(given["val"], eval_transform(size), read_channels),
        test=ImageFiles(given["test"], eval_transform(size), read_channels),
        class_names=list(cfg.class_names or classes),
        transform=Preprocess(size, channels, list(cfg.mean), list(cfg.std)),
        extra={"augmented": bool(cfg.augment)},
    )
