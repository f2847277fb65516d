"""The frequency family's network and the DCT it reads (torch at import: imported by
``frequency.py`` when it trains or scores, never by validation)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def dct_matrix(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The orthonormal DCT-II matrix D (n, n): y = D x; its inverse is D^T."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


def dct2(x: Tensor) -> Tensor:
    """Orthonormal 2-D DCT-II over the last two dimensions (per channel)."""
    dh, dw = dct_matrix(x.shape[-2], x.dtype).to(x.device), dct_matrix(x.shape[-1], x.dtype).to(x.device)
    return dh @ x @ dw.T


def idct2(y: Tensor) -> Tensor:
    """Inverse of :func:`dct2`."""
    dh, dw = dct_matrix(y.shape[-2], y.dtype).to(y.device), dct_matrix(y.shape[-1], y.dtype).to(y.device)
    return dh.T @ y @ dw


class DctNet(nn.Module):
    """The paper's 6-conv binary CNN on standardized per-channel DCT coefficients of a pixel-space
    image in [0, 1]; outputs 2 logits (clean, poison)."""

    def __init__(self, input_shape: tuple[int, int, int], width: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.register_buffer("dct_mean", torch.zeros(c, h, w))
        self.register_buffer("dct_std", torch.ones(c, h, w))
        layers: list[nn.Module] = []
        cin = c
        for mult, drop in ((1, 0.2), (2, 0.3), (4, 0.4)):
            cout = width * mult
            for i in range(2):
                layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.ELU(), nn.BatchNorm2d(cout)]
            layers += [nn.MaxPool2d(2), nn.Dropout(drop)]
            cin = cout
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"frequency: inputs of {input_shape[1]}x{input_shape[2]} px are too small (>= 8 px)")
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin * h * w, 2)

    def forward(self, x: Tensor) -> Tensor:
        z = (dct2(x) - self.get_buffer("dct_mean")) / self.get_buffer("dct_std")
        return self.head(self.features(z).flatten(1))  # type: ignore[no-any-return]
