"""Image files, in one place: which files are images (:data:`IMAGE_EXTENSIONS`, :func:`image_files`)
and decoding them with PIL (no pickles): into uint8 arrays for the registered image-folder
datasets (:func:`read_image`, :func:`read_images` on a thread pool), or into float pixels in [0, 1]
by each image's own value range for a user's folder of clean images (:func:`decode_pixels`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bdx_study.data._core import DataError

Fit = Literal["stretch", "center_crop"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL modes of 16-bit grayscale


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (by extension, any case), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


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


def decode_pixels(im: Any, c: int, h: int, w: int) -> np.ndarray:
    """One opened PIL image as float32 (H, W, C) in [0, 1], converted by its value range: 8-bit
    images through PIL ("L" or "RGB", alpha dropped), 16-bit and 32-bit grayscale by their own
    range (PIL's conversion to 8 bits would clip them to white), float images as they are if in
    [0, 1]; resized to H x W (bilinear) when their size differs. ValueError on values outside."""
    from PIL import Image

    if im.mode not in (*HIGH_DEPTH, "I", "F"):
        im = im.convert("L" if c == 1 else "RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.float32).reshape(h, w, c) / 255.0
    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError(f"a float image with values in [{np.nanmin(a):.3g}, {np.nanmax(a):.3g}]; expected [0, 1]")
        scale = 1.0
    else:  # 16-bit, or 32-bit integers ("I": 16-bit PNGs in older PIL) holding 16- or 8-bit values
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"integer pixels span [{a.min():.0f}, {a.max():.0f}]; expected 8 or 16 bits")
        scale = 65535.0 if im.mode in HIGH_DEPTH or a.max() > 255 else 255.0
    g = Image.fromarray((a / scale).astype(np.float32))  # mode "F"
    if g.size != (w, h):
        g = g.resize((w, h), Image.Resampling.BILINEAR)
    out = np.clip(np.asarray(g, dtype=np.float32), 0.0, 1.0)[..., None]
    return np.repeat(out, c, axis=2)
