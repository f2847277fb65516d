"""digits: scikit-learn's bundled 1,797 real 8x8 handwritten digits, resized to 16x16.

Held as float32 (1.8 MB): the images come from interpolation, not from image files, and
rounding them to uint8 would change every digits victim for no memory gain.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from bdx_study.data._core import DatasetInfo, ImageData, register_dataset


@register_dataset(DatasetInfo("digits", (1, 16, 16), 10, (0.31,), (0.38,), crop_padding=1, horizontal_flip=False))
def _load_digits(root: Path | None, download: bool) -> tuple[ImageData, ImageData]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    # digits has no official split: a fixed permutation, 700 images form the test portion.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))
    test, train = perm[:700], perm[700:]
    return ImageData(x[train], y[train]), ImageData(x[test], y[test])
