"""Image-folder datasets (ImageNet subsets such as Imagenette): ``train/`` and ``val/`` folders
of class folders, as torchvision's ImageFolder reads them (classes = sorted folder names).

Images are decoded through PIL, resized on the shorter side and centre-cropped to a square
(64x64 by default), and held as uint8: Imagenette's 13,394 images take 165 MB at 64x64.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bdx_study.data._core import Arrays, DataError, DatasetInfo, Loader, register_dataset
from bdx_study.data._images import IMAGE_EXTENSIONS, image_files, read_images

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def find_split_root(name: str, root: Path | None, subfolders: Sequence[str]) -> Path:
    """The folder holding ``train/`` and ``val/``: ``root`` or one of ``root/<subfolder>``."""
    if root is None:
        raise DataError(f"dataset {name!r} needs data.root (a folder holding train/ and val/ class folders)")
    candidates = [root, *(root / s for s in subfolders)]
    for c in candidates:
        if (c / "train").is_dir() and (c / "val").is_dir():
            return c
    raise DataError(
        f"dataset {name!r}: no train/ and val/ folders found; looked in: {', '.join(str(c) for c in candidates)}. "
        "Set data.root to a folder with train/<class>/*.JPEG and val/<class>/*.JPEG."
    )


def list_image_folder(
    name: str, folder: Path, classes: list[str] | None = None
) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, classes) of a folder of class folders; ``classes`` fixes the order (val)."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes is not None and found != classes:
        raise DataError(f"dataset {name!r}: {folder} has classes {found}, but train/ has {classes}")
    files, labels = [], []
    for i, cls in enumerate(found):
        imgs = image_files(folder / cls)
        files += imgs
        labels += [i] * len(imgs)
    if not files:
        raise DataError(f"dataset {name!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return files, labels, found


def image_folder_loader(name: str, num_classes: int, size: int, subfolders: Sequence[str] = ()) -> Loader:
    """A loader for ``<root>[/<subfolder>]/{train,val}/<class>/<image>``; checks the class count."""

    def load(root: Path | None, download: bool) -> tuple[Arrays, Arrays]:
        base = find_split_root(name, root, subfolders)
        files, labels, classes = list_image_folder(name, base / "train")
        if len(classes) != num_classes:
            raise DataError(
                f"dataset {name!r}: {base / 'train'} has {len(classes)} class folders, expected {num_classes}"
            )
        vfiles, vlabels, _ = list_image_folder(name, base / "val", classes)
        train = Arrays(read_images(files, size, 3, "center_crop"), np.array(labels, dtype=np.int64))
        test = Arrays(read_images(vfiles, size, 3, "center_crop"), np.array(vlabels, dtype=np.int64))
        return train, test

    return load


def register_image_folder(
    name: str,
    num_classes: int,
    size: int = 64,
    *,
    subfolders: Sequence[str] = (),
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    crop_padding: int | None = None,
) -> DatasetInfo:
    """Register an image-folder dataset (RGB, ``size`` x ``size``); returns its info.
    Augmentation: random crop with ``size // 8`` padding and horizontal flips."""
    info = DatasetInfo(
        name, (3, size, size), num_classes, mean, std, size // 8 if crop_padding is None else crop_padding, True
    )
    register_dataset(info)(image_folder_loader(name, num_classes, size, subfolders))
    return info


# Imagenette (fast.ai): 10 easy ImageNet classes; torchvision's Imagenette extracts to these folders.
register_image_folder("imagenette", 10, 64, subfolders=("imagenette2-160", "imagenette2-320", "imagenette2"))
