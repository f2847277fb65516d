"""GTSRB in torchvision's folder format, decoded through PIL and resized to 32x32 (uint8).

    <root>/gtsrb/GTSRB/Training/<class, 5 digits>/*.ppm      training images, one folder per class
    <root>/gtsrb/GTSRB/Final_Test/Images/*.ppm               test images
    <root>/gtsrb/GT-final_test.csv                          test labels (';'-separated: Filename, ClassId)

``data.root`` may also point at the ``gtsrb`` folder itself. Images are resized whole (no ROI
crop), as torchvision's GTSRB with Resize((32, 32)) and the backdoor toolbox do.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from bdx_study.data._core import Arrays, DataError, DatasetInfo, register_dataset
from bdx_study.data._images import read_images

GTSRB_CLASSES = 43


def _base(root: Path | None) -> Path:
    if root is None:
        raise DataError("dataset 'gtsrb' needs data.root (a folder holding gtsrb/GTSRB/Training, torchvision's layout)")
    for base in (root / "gtsrb", root):
        if (base / "GTSRB" / "Training").is_dir():
            return base
    raise DataError(
        f"dataset 'gtsrb': no GTSRB/Training folder found; looked in {root / 'gtsrb'} and {root}. Put GTSRB in "
        "torchvision's layout there (gtsrb/GTSRB/Training/<class>/*.ppm, gtsrb/GTSRB/Final_Test/Images, "
        "gtsrb/GT-final_test.csv), or set data.download: true where the network allows."
    )


def _train_samples(folder: Path) -> list[tuple[Path, int]]:
    samples = []
    for cls_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not cls_dir.name.isdigit() or not 0 <= int(cls_dir.name) < GTSRB_CLASSES:
            raise DataError(f"dataset 'gtsrb': {cls_dir} is not a class folder 00000..{GTSRB_CLASSES - 1:05d}")
        samples += [(p, int(cls_dir.name)) for p in sorted(cls_dir.glob("*.ppm"))]
    if not samples:
        raise DataError(f"dataset 'gtsrb': no .ppm images under {folder}")
    return samples


def _test_samples(base: Path) -> list[tuple[Path, int]]:
    table = base / "GT-final_test.csv"
    images = base / "GTSRB" / "Final_Test" / "Images"
    if not table.is_file() or not images.is_dir():
        raise DataError(f"dataset 'gtsrb': test labels {table} or test images {images} missing")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
    if not rows or "Filename" not in rows[0] or "ClassId" not in rows[0]:
        raise DataError(f"dataset 'gtsrb': {table} lacks the Filename and ClassId columns")
    return [(images / r["Filename"], int(r["ClassId"])) for r in rows]


def _load(samples: list[tuple[Path, int]]) -> Arrays:
    missing = [str(p) for p, _ in samples if not p.is_file()]
    if missing:
        raise DataError(f"dataset 'gtsrb': {len(missing)} image file(s) missing, e.g. {missing[0]}")
    x = read_images([p for p, _ in samples], 32, 3, "stretch")
    return Arrays(x, np.array([c for _, c in samples], dtype=np.int64))


@register_dataset(
    DatasetInfo(
        "gtsrb",
        (3, 32, 32),
        GTSRB_CLASSES,
        (0.3337, 0.3064, 0.3171),
        (0.2672, 0.2564, 0.2629),
        4,
        horizontal_flip=False,
    )
)
def _load_gtsrb(root: Path | None, download: bool) -> tuple[Arrays, Arrays]:
    if download and root is not None and not (root / "gtsrb" / "GTSRB" / "Training").is_dir():
        from torchvision.datasets import GTSRB

        GTSRB(str(root), split="train", download=True)
        GTSRB(str(root), split="test", download=True)
    base = _base(root)
    return _load(_train_samples(base / "GTSRB" / "Training")), _load(_test_samples(base))
