"""digits: scikit-learn's bundled 1,797 real 8x8 handwritten digits, resized to 16x16.

Held as float32 (1.8 MB): the images come from interpolation, not from image files, and
rounding them to uint8 would change every digits victim for no memory gain.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bdx_study.data._core import DatasetInfo, ImageData, register_dataset


@register_dataset(DatasetInfo("digits", (1, 16, 16), 10, (0.31,), (0.38,), crop_padding=1, horizontal_flip=False))
def _load_digits(root: Path | None, download: bool) -> tuple[ImageData, ImageData]:
    images, target = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    y = torch.tensor(target, dtype=torch.int64)
    # digits has no official split: a fixed permutation, 700 images form the test portion.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))
    test, train = perm[:700], perm[700:]
    return ImageData(x[train], y[train]), ImageData(x[test], y[test])


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (8x8 images 0..16, labels), read from the CSV file scikit-learn
    ships, the one its ``load_digits`` reads: importing scikit-learn costs about a second, which
    ``validate`` would otherwise pay. Falls back to ``load_digits`` if the file has moved."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        csv = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            data = np.loadtxt(csv, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target
