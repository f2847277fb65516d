"""The torch side of the data contract: :class:`ImageData` (images as tensors), the loaded
splits and training augmentation. Everything here wraps what :mod:`bdx_study.data._core` reads
and cuts (numpy arrays, index arrays) with ``torch.from_numpy``: no copies, the same splits.

Images live in :class:`ImageData`: pixels stored as uint8 (what the loaders of image files
produce; an ImageNet subset fits in memory) or float32 in [0, 1] (what triggers produce), read
as float32 in [0, 1] one batch at a time. Triggers are applied in that [0, 1] pixel space;
normalization belongs to the model (see ``bdx_study.archs``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bdx_study.data._core import (
    Arrays,
    DataError,
    DatasetInfo,
    check_portion,
    dataset_info,
    load_arrays,
    resolve_root,
    split_indices,
)

Index = Tensor | slice


def to_uint8(x: Tensor) -> Tensor:
    """Float pixels in [0, 1] -> uint8 0..255 (rounded, as an image file would hold them)."""
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class ImageData:
    """Images (N, C, H, W) and int64 labels (N,).

    ``pixels`` is the storage, kept as given: uint8 0..255 (the loaders; 4x smaller) or float32
    in [0, 1]. Read images as float32 in [0, 1] with :meth:`images` (a batch: only those rows are
    converted) or :attr:`x` (all of them: a converted copy when the storage is uint8, so prefer
    :meth:`images` on large data).
    """

    pixels: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.pixels.dtype not in (torch.uint8, torch.float32):
            raise TypeError(f"ImageData pixels must be uint8 or float32, got {self.pixels.dtype}")
        if self.pixels.ndim != 4:
            raise ValueError(f"ImageData pixels must be (N, C, H, W), got shape {tuple(self.pixels.shape)}")
        if self.y.shape != (self.pixels.shape[0],):
            raise ValueError(f"{self.pixels.shape[0]} images but labels of shape {tuple(self.y.shape)}")

    @classmethod
    def from_arrays(cls, data: Arrays) -> ImageData:
        """Wrap numpy arrays (shared, not copied; a read-only array is copied)."""
        px, y = (a if a.flags.writeable else a.copy() for a in data)
        return cls(torch.from_numpy(px), torch.from_numpy(y))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.pixels.shape[1:]
        return int(c), int(h), int(w)

    @property
    def x(self) -> Tensor:
        """All images as float32 in [0, 1] (the storage itself when it is float32: do not modify)."""
        return self.images()

    def images(self, idx: Index | None = None) -> Tensor:
        """Float32 images in [0, 1] of rows ``idx`` (all when None)."""
        p = self.pixels if idx is None else self.pixels[idx]
        return p.float().div_(255.0) if p.dtype == torch.uint8 else p

    def take(self, idx: Index) -> ImageData:
        """The rows ``idx`` (storage dtype kept)."""
        return ImageData(self.pixels[idx], self.y[idx])

    def with_rows(self, idx: Tensor, x: Tensor, y: Tensor) -> ImageData:
        """A copy with rows ``idx`` replaced by float images ``x`` in [0, 1] and labels ``y``;
        uint8 storage stores them rounded to 0..255, as image files would."""
        pixels, labels = self.pixels.clone(), self.y.clone()
        if len(idx):
            pixels[idx] = to_uint8(x) if pixels.dtype == torch.uint8 else x.to(torch.float32)
            labels[idx] = y
        return ImageData(pixels, labels)

    def batches(self, batch_size: int = 512) -> list[Tensor]:
        """Index tensors of consecutive batches covering every row (for batched evaluation)."""
        n = len(self)
        return [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


@dataclass(frozen=True)
class Splits:
    info: DatasetInfo
    train: ImageData
    reserve: ImageData
    selection: ImageData
    evaluation: ImageData


def check_loaded(name: str, train: ImageData, test: ImageData) -> None:
    """A loader's output matches its registered facts (shape, label range)."""
    for part, data in (("train", train), ("test", test)):
        lo, hi = (int(data.y.min()), int(data.y.max())) if len(data) else (None, None)
        check_portion(name, part, data.shape, lo, hi)


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, root: Path | None, download: bool) -> tuple[ImageData, ImageData]:
    """:func:`~bdx_study.data.load_arrays` as (train, test) ImageData sharing its arrays."""
    train, test = load_arrays(name, root, download)
    return ImageData.from_arrays(train), ImageData.from_arrays(test)


def load_test_portion(name: str, *, root: str | os.PathLike[str] | None = None, download: bool = False) -> ImageData:
    """The whole test portion of ``name`` (reserve, selection and evaluation come from it)."""
    return _load_cached(name, resolve_root(root), download)[1]


def _rows(idx: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(idx))


def load_splits(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    reserve_size: int,
    eval_size: int | None = None,
    selection_fraction: float = 0.5,
    train_size: int | None = None,
    split_seed: int = 0,
    download: bool = False,
) -> Splits:
    """Load ``name`` and cut its disjoint splits (:func:`~bdx_study.data.split_indices` says how)."""
    info = dataset_info(name)
    train, test = _load_cached(name, resolve_root(root), download)
    idx = split_indices(
        name,
        len(train),
        len(test),
        reserve_size=reserve_size,
        eval_size=eval_size,
        selection_fraction=selection_fraction,
        train_size=train_size,
        split_seed=split_seed,
    )
    return Splits(
        info=info,
        train=train if idx.train is None else train.take(_rows(idx.train)),
        reserve=test.take(_rows(idx.reserve)),
        selection=test.take(_rows(idx.selection)),
        evaluation=test.take(_rows(idx.evaluation)),
    )


def defender_split(reserve: ImageData, clean_set_size: int, calibration_fraction: float) -> tuple[ImageData, ImageData]:
    """The defender's clean set D_c (the first ``clean_set_size`` reserved images), split into
    (finetune part, calibration part); the calibration part is the last
    ``round(clean_set_size * calibration_fraction)`` images of D_c."""
    if not 2 <= clean_set_size <= len(reserve):
        raise DataError(f"clean_set_size {clean_set_size} must be in [2, {len(reserve)}] (the reserved pool)")
    n_cal = round(clean_set_size * calibration_fraction)
    if not 1 <= n_cal < clean_set_size:
        raise DataError(
            f"calibration_fraction {calibration_fraction} leaves {n_cal} of {clean_set_size} images to calibrate on"
        )
    cut = clean_set_size - n_cal
    return reserve.take(slice(0, cut)), reserve.take(slice(cut, clean_set_size))


def augment_batch(x: Tensor, info: DatasetInfo, gen: torch.Generator) -> Tensor:
    """Training augmentation of a float batch in pixel space: random crop with zero padding,
    optional horizontal flip. The random offsets and flips are drawn from the CPU generator
    ``gen`` (the same draws whatever the batch's device); the cropping and flipping run on the
    batch's device."""
    n, c, h, w = x.shape
    p = info.crop_padding
    dev = x.device
    if p > 0:
        xp = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(dev, non_blocking=True)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(dev, non_blocking=True)
        rows = dy[:, None] + torch.arange(h, device=dev)[None, :]
        cols = dx[:, None] + torch.arange(w, device=dev)[None, :]
        n_idx = torch.arange(n, device=dev)[:, None, None, None]
        c_idx = torch.arange(c, device=dev)[None, :, None, None]
        x = xp[n_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]
    if info.horizontal_flip:
        flip = (torch.rand(n, generator=gen) < 0.5).to(dev, non_blocking=True)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x
