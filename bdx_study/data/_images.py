"""Decoding image files with PIL into uint8 numpy arrays (no pickles; decoding runs on a thread pool)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np

from bdx_study.data._core import DataError

Fit = Literal["stretch", "center_crop"]


def read_image(path: Path, size: int, channels: int = 3, fit: Fit = "stretch") -> np.ndarray:
    """One image file -> uint8 (channels, size, size). ``stretch`` resizes to size x size (as
    torchvision's Resize((s, s))); ``center_crop`` resizes the shorter side to ``size`` and crops
    the centre (Resize(s) + CenterCrop(s))."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB" if channels == 3 else "L", (size, size))  # fast JPEG downscale; no-op otherwise
            im = im.convert("RGB" if channels == 3 else "L")
            if fit == "center_crop":
                w, h = im.size
                scale = size / min(w, h)
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                im = im.resize((nw, nh), Image.Resampling.BILINEAR)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
            else:
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_images(paths: Sequence[Path], size: int, channels: int = 3, fit: Fit = "stretch") -> np.ndarray:
    """Many image files -> uint8 (N, channels, size, size), decoded on a thread pool."""
    out = np.empty((len(paths), channels, size, size), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = read_image(paths[i], size, channels, fit)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(len(paths))))
    return out
