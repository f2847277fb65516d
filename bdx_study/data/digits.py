"""digits: scikit-learn's bundled 1,797 real 8x8 handwritten digits, resized to 16x16.

Held as float32 (1.8 MB): the images come from interpolation, not from image files, and
rounding them to uint8 would change every digits victim for no memory gain.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from bdx_study.data._core import Arrays, DatasetInfo, randperm, register_dataset


@register_dataset(DatasetInfo("digits", (1, 16, 16), 10, (0.31,), (0.38,), crop_padding=1, horizontal_flip=False))
def _load_digits(root: Path | None, download: bool) -> tuple[Arrays, Arrays]:
    images, target = _digits_arrays()
    x = images.astype(np.float32)[:, None] / np.float32(16.0)
    x = np.clip(_resize_bilinear(x, 16, 16), 0.0, 1.0)
    y = np.asarray(target, dtype=np.int64)
    # digits has no official split: a fixed permutation, 700 images form the test portion.
    perm = randperm(len(y), 12345)
    test, train = perm[:700], perm[700:]
    return Arrays(x[train], y[train]), Arrays(x[test], y[test])


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (i0, i1) and weights (w0, w1) of linear resizing n_in -> n_out, half-pixel
    centres (torch's align_corners=False)."""
    src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5, 0.0)
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, np.float32(1.0) - w1, w1


def _resize_bilinear(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Float32 images (N, C, H, W) -> (N, C, h, w): torch's ``F.interpolate(x, (h, w),
    mode="bilinear", align_corners=False)`` in numpy. Equal to the bit where every product and sum
    is exact in float32, as for digits (8 -> 16: weights 1/4 and 3/4 on multiples of 1/16, which
    tests/test_data_torchfree.py checks against torch); elsewhere within float32 rounding."""
    r0, r1, a0, a1 = _taps(x.shape[2], h)
    c0, c1, b0, b1 = _taps(x.shape[3], w)
    top, bottom = x[:, :, r0], x[:, :, r1]
    row = a0[:, None] * (b0 * top[..., c0] + b1 * top[..., c1])
    return row + a1[:, None] * (b0 * bottom[..., c0] + b1 * bottom[..., c1])


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
