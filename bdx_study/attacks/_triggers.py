"""Pure tensor functions for trigger maths, in pixel space [0, 1]: no file I/O, no globals, no
device choice (results follow the inputs' device)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from bdx_study._lazy import LazyModule
from bdx_study.attacks._base import check_placement, corner_positions

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import Tensor
else:
    torch = LazyModule("torch")
    F = LazyModule("torch.nn.functional")


def patch_blend(x: Tensor, trigger: Tensor, mask: Tensor, alpha: float | Tensor) -> Tensor:
    """The generic operator x' = x + alpha * m * (t - x): a patch is alpha = 1 with a local mask,
    a blend is mask = 1. ``trigger`` (C, H, W) and ``mask`` (1 or C, H, W) broadcast over N."""
    return (x + alpha * mask * (trigger - x)).clamp(0.0, 1.0)


def checkerboard(size: int) -> Tensor:
    """(size, size) black/white checkerboard; size 3 is the toolbox's BadNet patch, rows from the
    top (B,B,W), (B,W,B), (W,B,W)."""
    if size == 3:
        return torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    i = torch.arange(size)
    return ((i[:, None] + i[None, :]) % 2).float()


def place(shape: tuple[int, int, int], pattern: Tensor, top: int, left: int) -> tuple[Tensor, Tensor]:
    """(trigger (C, H, W), mask (1, H, W)) with ``pattern`` ((h, w) or (C, h, w)) at (top, left)."""
    c, h, w = shape
    pat = pattern if pattern.ndim == 3 else pattern.expand(c, *pattern.shape)
    ph, pw = pat.shape[1:]
    check_placement(shape, (ph, pw), top, left)
    trigger, mask = torch.zeros(c, h, w), torch.zeros(1, h, w)
    trigger[:, top : top + ph, left : left + pw] = pat
    mask[:, top : top + ph, left : left + pw] = 1.0
    return trigger, mask


def merge(*parts: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Union of (trigger, mask) pairs; later ones win where they overlap."""
    trigger, mask = parts[0][0].clone(), parts[0][1].clone()
    for t, m in parts[1:]:
        trigger = torch.where(m.bool(), t, trigger)
        mask = torch.maximum(mask, m)
    return trigger, mask


def corner_patches(shape: tuple[int, int, int], size: int = 3, margin: int = 0) -> tuple[Tensor, Tensor]:
    """Four ``size`` x ``size`` checkerboards, one in each corner (the toolbox's badnet_patch4),
    mirrored so that each corner shows the same pattern seen from its corner."""
    board = checkerboard(size)
    boards = [board.flip(0).flip(1), board.flip(0), board.flip(1), board]  # top left, top right, bottom left, right
    return merge(*(place(shape, b, *at) for b, at in zip(boards, corner_positions(shape, size, margin), strict=True)))


def seeded_pattern(shape: tuple[int, int, int], gen: torch.Generator, binary: bool = False) -> Tensor:
    """A seeded random pattern: U(0, 1), or values in {0, 1} when ``binary``."""
    t = torch.rand(shape, generator=gen)
    return (t > 0.5).float() if binary else t


def smooth_pattern(shape: tuple[int, int, int], gen: torch.Generator, cells: int = 4) -> Tensor:
    """A seeded smooth colour pattern in [0, 1]: U(0, 1) on a cells x cells grid, upsampled
    bicubically (a stand-in for a natural picture: structure at a few scales)."""
    c, h, w = shape
    coarse = torch.rand(1, c, cells, cells, generator=gen)
    fine = torch.rand(1, c, h, w, generator=gen)
    up = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    return (0.8 * up + 0.2 * fine).clamp(0.0, 1.0)[0]


def sinusoid(shape: tuple[int, int, int], delta: float, freq: float) -> Tensor:
    """SIG's signal v(i, j) = delta * sin(2 pi j f / W): vertical stripes, the same on every row
    and channel; shape (C, H, W)."""
    c, h, w = shape
    j = torch.arange(w, dtype=torch.float32)
    return (delta * torch.sin(2 * math.pi * j * freq / w)).expand(c, h, w).clone()


# ------------------------------------------------------------------------------ warping (WaNet)


def identity_grid(h: int, w: int) -> Tensor:
    """(1, H, W, 2) sampling grid of the identity warp, (x, y) in [-1, 1], align_corners=True."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack([xs, ys], dim=-1)[None]


def wanet_noise_grid(k: int, h: int, w: int, gen: torch.Generator) -> Tensor:
    """WaNet's warping field: a 2 x k x k control grid U(-1, 1), divided by its mean absolute
    value, upsampled bicubically (align_corners=True) to (1, H, W, 2)."""
    ins = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
    ins = ins / ins.abs().mean()
    return F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def wanet_grid(noise_grid: Tensor, strength: float, grid_rescale: float = 1.0) -> Tensor:
    """The warp grid clamp(identity + s * noise / H, -1, 1) (rescaled by ``grid_rescale``)."""
    _, h, w, _ = noise_grid.shape
    grid = identity_grid(h, w).to(noise_grid) + strength * noise_grid / h
    return (grid * grid_rescale).clamp(-1.0, 1.0)


def warp(x: Tensor, grid: Tensor) -> Tensor:
    """``x`` (N, C, H, W) resampled at ``grid`` ((1 or N), H, W, 2), bilinear, align_corners=True."""
    g = grid.to(x).expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, g, mode="bilinear", padding_mode="border", align_corners=True).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------ quantization (Bpp)


def quantize(x: Tensor, levels: int) -> Tensor:
    """Colour-depth squeezing to ``levels`` values per channel: round(x (q - 1)) / (q - 1)."""
    return torch.round(x * (levels - 1)) / (levels - 1)


def dither_quantize(x: Tensor, levels: int) -> Tensor:
    """Quantization with Floyd-Steinberg error diffusion (right 7/16, down-left 3/16, down 5/16,
    down-right 1/16), raster order, vectorized over the batch and channels."""
    n, c, h, w = x.shape
    if n == 0:
        return x.clone()
    buf = F.pad(x.to(torch.float32), (1, 1, 0, 1))  # a guard column each side and a guard row below
    out = torch.empty_like(x, dtype=torch.float32)
    q = levels - 1
    for i in range(h):
        row = buf[:, :, i]
        below = buf[:, :, i + 1]
        for j in range(1, w + 1):
            old = row[:, :, j]
            new = torch.round(old.clamp(0.0, 1.0) * q) / q
            err = old - new
            out[:, :, i, j - 1] = new
            row[:, :, j + 1] += err * (7 / 16)
            below[:, :, j - 1] += err * (3 / 16)
            below[:, :, j] += err * (5 / 16)
            below[:, :, j + 1] += err * (1 / 16)
    return out.to(x.dtype)


# ------------------------------------------------------------------------------ frequency domain


def dct_matrix(n: int) -> Tensor:
    """The orthonormal DCT-II matrix D (n, n): coefficients = D @ signal, signal = D.T @ coefficients."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.to(torch.float32)


def dct2(x: Tensor) -> Tensor:
    """2-D orthonormal DCT-II over the last two dimensions (square)."""
    d = dct_matrix(x.shape[-1]).to(x)
    return d @ x @ d.T


def idct2(c: Tensor) -> Tensor:
    d = dct_matrix(c.shape[-1]).to(c)
    return d.T @ c @ d


def rgb_to_yuv(x: Tensor) -> Tensor:
    """(N, 3, H, W) RGB -> YUV (BT.601, as FTrojan)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = -0.14713 * r - 0.28886 * g + 0.436 * b
    v = 0.615 * r - 0.51499 * g - 0.10001 * b
    return torch.stack([y, u, v], dim=1)


def yuv_to_rgb(x: Tensor) -> Tensor:
    y, u, v = x[:, 0], x[:, 1], x[:, 2]
    r = y + 1.13983 * v
    g = y - 0.39465 * u - 0.58060 * v
    b = y + 2.03211 * u
    return torch.stack([r, g, b], dim=1)


def lowpass(x: Tensor, keep: int) -> Tensor:
    """Keep the ``keep`` x ``keep`` lowest DCT frequencies of every (H, W) plane of ``x``."""
    c = dct2(x)
    mask = torch.zeros(c.shape[-2:], device=x.device, dtype=x.dtype)
    mask[:keep, :keep] = 1.0
    return idct2(c * mask)
