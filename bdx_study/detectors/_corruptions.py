"""Common image corruptions in torch, batched, at severities 1..5 (for TeCo).

Our own implementation of the corruption types of Hendrycks & Dietterich (ICLR 2019), with
either of their two severity tables (:data:`TABLES`, in ``_corruption_tables.py``):

- ``imagenet_c``: the ImageNet-C settings, as the ``imagecorruptions`` package applies them and
  as TeCo's peers (BackdoorBench) apply that package to CIFAR-10's 32x32 images, unchanged;
- ``cifar10_c``: the milder settings Hendrycks & Dietterich made for CIFAR-10-C.

Every function is pure: it returns a new tensor and never changes its input, so a caller can
apply each corruption to the original image. Inputs and outputs are pixel-space (B, C, H, W)
tensors in [0, 1], any C and size.

- **Spatial sizes are read at 32x32 and scale with the image**: a blur radius or sigma, a
  displacement, in pixels at 32x32 (CIFAR-10, where the peers apply the tables), is multiplied
  by min(H, W) / 32 (so severity s distorts 16x16 digits as much, relatively, as CIFAR-10);
  zoom, pixelation, noise, colour and JPEG settings do not depend on size.
- **Randomness** comes in as ``draws``: tensors made per input by :func:`draw_batch` from a
  generator seeded with a hash of (seed, corruption name, the input's exact pixels), so an input
  gets the same corruption whatever batch it is scored in.
- **Which apply**: all of :data:`CORRUPTIONS` apply to 1- and 3-channel inputs of any size
  except ``saturate`` (needs colour: 3 channels). Not ported: ``frost`` (blends photographs of
  frost shipped with the reference code), ``snow`` and ``spatter`` (weather layers rendered with
  motion-blurred noise and OpenCV edge and distance transforms).
- **Approximations**: ``glass_blur`` moves each pixel by a random integer offset (a gather, up
  to the table's maximum, stochastically rounded so that small images move fewer pixels) instead
  of the reference's sequential pixel swaps; ``motion_blur`` is a one-sided Gaussian line kernel
  of 2r + 1 samples at a random angle in [-45, 45] degrees, splatted bilinearly; ``fog`` uses
  multi-octave value noise (amplitude 1 / decay per octave) instead of diamond-square plasma;
  ``elastic_transform`` (``cifar10_c``) jitters three points of an affine map as the reference
  does, then displaces pixels by a smoothed random field (``imagenet_c``: the field only, as in
  the ``imagecorruptions`` package); ``jpeg_compression`` uses Pillow, as the reference does.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._corruption_tables import SEVERITIES, TABLES, corruption_names

Apply = Callable[[Tensor, Any, Tensor | None], Tensor]  # (x, this severity's setting, its draws) -> x'
Draw = Callable[[Tensor, torch.Generator, Sequence[Any]], Tensor]  # (image (C, H, W), gen, 5 settings) -> draws

REFERENCE_SIZE = 32.0  # the image size at which the tables' pixel sizes hold (``TABLES``)
GLASS_ROUNDS = 3  # the most rounds of pixel moves in either table


@dataclass(frozen=True)
class Corruption:
    name: str
    apply: Apply
    draw: Draw | None = None  # None: deterministic
    needs_color: bool = False


CORRUPTIONS: dict[str, Corruption] = {}


def _register(name: str, draw: Draw | None = None, needs_color: bool = False) -> Callable[[Apply], Apply]:
    def deco(fn: Apply) -> Apply:
        CORRUPTIONS[name] = Corruption(name, fn, draw, needs_color)
        return fn

    return deco


def applicable(input_shape: tuple[int, int, int]) -> list[str]:
    """The corruptions that apply to inputs of ``input_shape`` (C, H, W), in table order."""
    return [n for n, c in CORRUPTIONS.items() if input_shape[0] == 3 or not c.needs_color]


def setting(table: str, name: str, severity: int) -> Any:
    """The setting of corruption ``name`` at ``severity`` (1..5) in ``table``."""
    return TABLES[table][name][severity - 1]


def corrupt(x: Tensor, name: str, severity: int, draws: Tensor | None, table: str) -> Tensor:
    """``x`` corrupted by ``name`` at ``severity`` with its draws (B, 5, ...) from :func:`draw_batch`."""
    return CORRUPTIONS[name].apply(x, setting(table, name, severity), None if draws is None else draws[:, severity - 1])


# ------------------------------------------------------------------------------------ randomness


def input_seeds(x: Tensor, seed: int, salt: str) -> list[int]:
    """One 63-bit seed per input from (seed, salt, the input's exact float32 pixels)."""
    base = hashlib.blake2b(f"{seed}:{salt}".encode(), digest_size=8)
    arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
    out = []
    for img in arr:
        h = base.copy()
        h.update(np.ascontiguousarray(img).tobytes())
        out.append(int.from_bytes(h.digest(), "little") & (2**63 - 1))
    return out


def draw_batch(corruption: Corruption, x: Tensor, seed: int, table: str) -> Tensor | None:
    """The random draws of ``corruption`` for every input of ``x``: (B, 5, ...) on x's device,
    None for a deterministic corruption (or an empty batch)."""
    if corruption.draw is None or len(x) == 0:
        return None
    cpu = x.detach().cpu()
    settings = TABLES[table].get(corruption.name, [None] * SEVERITIES)
    gens = [torch.Generator().manual_seed(s) for s in input_seeds(cpu, seed, corruption.name)]
    return torch.stack([corruption.draw(img, g, settings) for img, g in zip(cpu, gens, strict=True)]).to(x.device)


# ------------------------------------------------------------------------------------ helpers


def _scale(x: Tensor) -> float:
    """Pixel sizes of the tables (at 32x32) are multiplied by this."""
    return min(x.shape[-2:]) / REFERENCE_SIZE


def _depthwise(x: Tensor, kernel: Tensor, mode: str = "replicate") -> Tensor:
    """Correlate every channel of ``x`` with ``kernel`` (kh, kw), or per image with (B, kh, kw)."""
    b, c, h, w = x.shape
    k = kernel if kernel.dim() == 3 else kernel.expand(b, *kernel.shape)
    kh, kw = k.shape[-2:]
    pad = (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2)
    if mode == "reflect" and (max(pad[:2]) >= w or max(pad[2:]) >= h):
        mode = "replicate"
    xp = F.pad(x.reshape(1, b * c, h, w), pad, mode=mode)
    weight = k.to(x).repeat_interleave(c, 0)[:, None]
    return F.conv2d(xp, weight, groups=b * c).view(b, c, h, w)


def _gauss1d(sigma: float, truncate: float) -> Tensor:
    r = max(1, math.ceil(truncate * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    return k / k.sum()


def gaussian_filter(x: Tensor, sigma: float, truncate: float = 4.0, mode: str = "replicate") -> Tensor:
    """Separable Gaussian blur of every channel (kernel radius ``truncate`` sigma)."""
    if sigma <= 0:
        return x.clone()
    k = _gauss1d(sigma, truncate)
    return _depthwise(_depthwise(x, k[None, :], mode), k[:, None], mode)


def _with_value(x: Tensor, new_v: Tensor) -> Tensor:
    """Set the HSV value (max over channels) to ``new_v``, keeping hue and saturation."""
    v = x.amax(1, keepdim=True)
    return torch.where(v > 0, x * new_v / v.clamp_min(1e-12), new_v.expand_as(x))


def _sample(x: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """Bilinear sample of ``x`` at pixel coordinates (B, H, W), reflecting at the edges."""
    h, w = x.shape[-2:]
    grid = torch.stack([2 * px / max(w - 1, 1) - 1, 2 * py / max(h - 1, 1) - 1], -1)
    return F.grid_sample(x, grid.to(x), mode="bilinear", padding_mode="reflection", align_corners=True)


def _pixel_grid(x: Tensor) -> tuple[Tensor, Tensor]:
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=x.dtype, device=x.device), torch.arange(w, dtype=x.dtype, device=x.device), indexing="ij"
    )
    return xx.expand(len(x), h, w), yy.expand(len(x), h, w)


# ------------------------------------------------------------------------------------ noise


def _normal(img: Tensor, g: torch.Generator, settings: Sequence[Any]) -> Tensor:
    return torch.randn((SEVERITIES, *img.shape), generator=g)


def _uniform2(img: Tensor, g: torch.Generator, settings: Sequence[Any]) -> Tensor:
    return torch.rand((SEVERITIES, 2, *img.shape), generator=g)


def _poisson(img: Tensor, g: torch.Generator, settings: Sequence[Any]) -> Tensor:
    rates = torch.tensor([float(c) for c in settings]).view(-1, 1, 1, 1) * img[None]
    return torch.poisson(rates, generator=g)


@_register("gaussian_noise", draw=_normal)
def gaussian_noise(x: Tensor, c: float, z: Tensor | None) -> Tensor:
    """x + N(0, c^2), clipped."""
    assert z is not None
    return (x + c * z).clamp(0, 1)


@_register("shot_noise", draw=_poisson)
def shot_noise(x: Tensor, c: float, counts: Tensor | None) -> Tensor:
    """Poisson(c x) / c, clipped (the counts are drawn from x by :func:`draw_batch`)."""
    assert counts is not None
    return (counts / c).clamp(0, 1)


@_register("impulse_noise", draw=_uniform2)
def impulse_noise(x: Tensor, c: float, u: Tensor | None) -> Tensor:
    """Salt and pepper: a share c of the values set to 0 or 1 (even odds)."""
    assert u is not None
    return torch.where(u[:, 0] < c, (u[:, 1] < 0.5).to(x), x)


@_register("speckle_noise", draw=_normal)
def speckle_noise(x: Tensor, c: float, z: Tensor | None) -> Tensor:
    """x + x N(0, c^2), clipped."""
    assert z is not None
    return (x + x * c * z).clamp(0, 1)


# ------------------------------------------------------------------------------------ blur


@_register("gaussian_blur")
def gaussian_blur(x: Tensor, sigma: float, _: Tensor | None) -> Tensor:
    return gaussian_filter(x, sigma * _scale(x)).clamp(0, 1)


def _glass_draw(img: Tensor, g: torch.Generator, settings: Sequence[Any]) -> Tensor:
    return torch.rand((SEVERITIES, GLASS_ROUNDS, 2, 2, *img.shape[-2:]), generator=g)  # (sev, round, y/x, u1/u2)


@_register("glass_blur", draw=_glass_draw)
def glass_blur(x: Tensor, c: tuple[float, int, int], u: Tensor | None) -> Tensor:
    """Blur (sigma), move every pixel by a random offset of up to ``delta`` pixels per axis
    (``rounds`` times), blur again. The offset is uniform in [-delta, delta] x scale, rounded
    stochastically to an integer (so half the pixels move per axis at delta 1 on 32x32)."""
    sigma, delta, rounds = c
    assert u is not None
    s = _scale(x)
    h, w = x.shape[-2:]
    out = gaussian_filter(x, sigma * s)
    yy = torch.arange(h, device=x.device).view(1, h, 1)
    xx = torch.arange(w, device=x.device).view(1, 1, w)
    for r in range(rounds):
        step = torch.floor((2 * u[:, r, :, 0] - 1) * delta * s + u[:, r, :, 1]).long()  # (B, 2, H, W)
        sy = (yy + step[:, 0]).clamp(0, h - 1)
        sx = (xx + step[:, 1]).clamp(0, w - 1)
        flat = (sy * w + sx).view(len(x), 1, h * w).expand(-1, x.shape[1], -1)
        out = out.flatten(2).gather(2, flat).view_as(x)
    return gaussian_filter(out, sigma * s).clamp(0, 1)


def _disk(radius: float, alias_blur: float) -> Tensor:
    """A normalized disk of ``radius`` pixels, antialiased by a 3x3 Gaussian of ``alias_blur``."""
    r = math.ceil(radius) + 1
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).float()
    g = torch.exp(-0.5 * (torch.arange(-1, 2, dtype=torch.float32) / alias_blur) ** 2)
    g = g / g.sum()
    k = F.conv2d(F.pad(disk[None, None], (1, 1, 1, 1)), (g[:, None] * g[None, :])[None, None])[0, 0]
    return k / k.sum()


@_register("defocus_blur")
def defocus_blur(x: Tensor, c: tuple[float, float], _: Tensor | None) -> Tensor:
    """Convolution with an antialiased disk of radius c[0] (alias blur c[1])."""
    radius, alias = c
    return _depthwise(x, _disk(radius * _scale(x), alias).to(x.device), mode="reflect").clamp(0, 1)


def _angle_draw(img: Tensor, g: torch.Generator, settings: Sequence[Any]) -> Tensor:
    return torch.rand(SEVERITIES, generator=g) * 90 - 45


def motion_kernel(radius: float, sigma: float, angles: Tensor) -> Tensor:
    """One-sided line kernels (B, K, K), one per angle in degrees: 2 radius + 1 samples from the
    centre outwards, Gaussian weights (``sigma``) by distance, splatted bilinearly."""
    length = 2 * radius
    half = max(1, math.ceil(length))
    size = 2 * half + 1
    t = torch.linspace(0, length, 2 * half + 1)
    wgt = torch.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    a = torch.deg2rad(angles.float().cpu())[:, None]
    px, py = half + t * torch.cos(a), half - t * torch.sin(a)
    k = torch.zeros(len(angles), size * size)
    x0, y0 = px.floor(), py.floor()
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            share = (1 - (px - xi).abs()) * (1 - (py - yi).abs()) * wgt
            ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
            idx = (yi.clamp(0, size - 1) * size + xi.clamp(0, size - 1)).long()
            k.scatter_add_(1, idx, torch.where(ok, share, torch.zeros_like(share)))
    return (k / k.sum(1, keepdim=True)).view(len(angles), size, size)


@_register("motion_blur", draw=_angle_draw)
def motion_blur(x: Tensor, c: tuple[float, float], angles: Tensor | None) -> Tensor:
    """Blur along a random direction (radius c[0], sigma c[1])."""
    radius, sigma = c
    assert angles is not None
    s = _scale(x)
    return _depthwise(x, motion_kernel(radius * s, sigma * s, angles).to(x.device)).clamp(0, 1)


@_register("zoom_blur")
def zoom_blur(x: Tensor, c: tuple[float, float], _: Tensor | None) -> Tensor:
    """Mean of the image and its centre zooms by 1, 1 + step, ... below ``top`` (c = (top, step))."""
    top, step = c
    factors = [1.0 + i * step for i in range(math.ceil((top - 1.0) / step - 1e-9))]
    out = x.clone()
    for f in factors:
        theta = torch.tensor([[1 / f, 0, 0], [0, 1 / f, 0]], dtype=x.dtype, device=x.device).expand(len(x), 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = out + F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (out / (len(factors) + 1)).clamp(0, 1)


# ------------------------------------------------------------------------------------ weather


def _octaves(img: Tensor) -> int:
    return max(1, math.ceil(math.log2(max(img.shape[-2:]))))


def _fog_draw(img: Tensor, g: torch.Generator, settings: Sequence[Any]) -> Tensor:
    n = _octaves(img)
    return torch.rand((SEVERITIES, n, 2**n, 2**n), generator=g) * 2 - 1


def fractal_noise(u: Tensor, decay: float, size: tuple[int, int]) -> Tensor:
    """(B, H, W) in [0, 1]: octave o (a 2^(o+1) grid of ``u[:, o]``) upsampled, amplitude decay^-o."""
    out = torch.zeros(len(u), 1, *size, device=u.device, dtype=u.dtype)
    for o in range(u.shape[1]):
        side = 2 ** (o + 1)
        grid = u[:, o : o + 1, :side, :side]
        out = out + decay**-o * F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    lo = out.amin((2, 3), keepdim=True)
    hi = out.amax((2, 3), keepdim=True)
    return ((out - lo) / (hi - lo).clamp_min(1e-12))[:, 0]


@_register("fog", draw=_fog_draw)
def fog(x: Tensor, c: tuple[float, float], u: Tensor | None) -> Tensor:
    """(x + strength * fractal) * max(x) / (max(x) + strength), c = (strength, decay)."""
    strength, decay = c
    assert u is not None
    top = x.amax((1, 2, 3), keepdim=True)
    layer = fractal_noise(u, decay, (x.shape[-2], x.shape[-1]))[:, None].to(x)
    return ((x + strength * layer) * top / (top + strength)).clamp(0, 1)


# ------------------------------------------------------------------------------------ digital


@_register("brightness")
def brightness(x: Tensor, c: float, _: Tensor | None) -> Tensor:
    """HSV value + c (hue and saturation kept; on 1 channel: x + c)."""
    return _with_value(x, (x.amax(1, keepdim=True) + c).clamp(0, 1)).clamp(0, 1)


@_register("contrast")
def contrast(x: Tensor, c: float, _: Tensor | None) -> Tensor:
    """(x - per-channel mean) * c + mean."""
    mean = x.mean((2, 3), keepdim=True)
    return ((x - mean) * c + mean).clamp(0, 1)


@_register("saturate", needs_color=True)
def saturate(x: Tensor, c: tuple[float, float], _: Tensor | None) -> Tensor:
    """HSV saturation * c[0] + c[1] (hue and value kept); 3-channel inputs only."""
    a, b = c
    if x.shape[1] != 3:
        raise ValueError(f"saturate needs 3-channel inputs, got {x.shape[1]} channels")
    v = x.amax(1, keepdim=True)
    lo = x.amin(1, keepdim=True)
    sat = torch.where(v > 0, (v - lo) / v.clamp_min(1e-12), torch.zeros_like(v))
    new_lo = v * (1 - (sat * a + b).clamp(0, 1))
    spread = v - lo
    grey_hue = torch.tensor([0.0, 1.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # hue 0 = red
    w = torch.where(spread > 0, (v - x) / spread.clamp_min(1e-12), grey_hue.expand_as(x))
    return (v - (v - new_lo) * w).clamp(0, 1)


@_register("jpeg_compression")
def jpeg_compression(x: Tensor, quality: int, _: Tensor | None) -> Tensor:
    """JPEG at ``quality`` through Pillow (as the reference), one image at a time on the CPU."""
    from PIL import Image

    u8 = (x.detach().cpu() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for img in u8:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="JPEG", quality=quality)
        dec = np.asarray(Image.open(buf), dtype=np.float32).reshape(img.shape)
        out.append(torch.from_numpy(dec / 255.0).permute(2, 0, 1))
    return torch.stack(out).to(x) if out else x.clone()


@_register("pixelate")
def pixelate(x: Tensor, c: float, _: Tensor | None) -> Tensor:
    """Box-downsample to a share c of the size, then nearest-upsample back."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def _elastic_draw(img: Tensor, g: torch.Generator, settings: Sequence[Any]) -> Tensor:
    h, w = img.shape[-2:]
    return torch.rand((SEVERITIES, 2 * h * w + 6), generator=g) * 2 - 1  # displacement fields + 3 points x 2


@_register("elastic_transform", draw=_elastic_draw)
def elastic_transform(x: Tensor, c: tuple[float, float, float], u: Tensor | None) -> Tensor:
    """A random affine map (three points jittered by up to c[2] pixels), then a displacement by a
    uniform random field smoothed with a Gaussian (sigma c[1], truncated at 3 sigma) times c[0]."""
    assert u is not None
    b, _, h, w = x.shape
    s = _scale(x)
    alpha, sigma, jitter = (v * s for v in c)
    field = u[:, : 2 * h * w].reshape(b, 2, h, w).to(x)
    px, py = _pixel_grid(x)
    if alpha > 0:
        smooth = gaussian_filter(field, sigma, truncate=3.0, mode="reflect") * alpha
        px, py = px + smooth[:, 0], py + smooth[:, 1]
    if jitter > 0:
        pts = u[:, 2 * h * w :].reshape(b, 3, 2).to(x)
        centre = torch.tensor([w // 2, h // 2], dtype=x.dtype, device=x.device)
        sq = float(min(h, w) // 3)
        src = torch.stack([centre + sq, centre + torch.tensor([sq, -sq], device=x.device), centre - sq])  # (3, 2)
        dst = src[None] + pts * jitter
        ones = torch.ones(b, 3, 1, dtype=x.dtype, device=x.device)
        inv = torch.linalg.solve(torch.cat([dst, ones], 2), src[None].expand(b, 3, 2))  # [x y 1] @ inv: dst -> src
        px, py = (
            px * inv[:, 0, 0, None, None] + py * inv[:, 1, 0, None, None] + inv[:, 2, 0, None, None],
            px * inv[:, 0, 1, None, None] + py * inv[:, 1, 1, None, None] + inv[:, 2, 1, None, None],
        )
    return _sample(x, px, py).clamp(0, 1)


# The names have one home, the tables (read without torch by the parameter models): one function each.
if list(CORRUPTIONS) != corruption_names() or any(set(t) != set(CORRUPTIONS) for t in TABLES.values()):
    raise RuntimeError(
        f"_corruptions implements {list(CORRUPTIONS)}; _corruption_tables lists {corruption_names()} "
        "(every table, in this order)"
    )
