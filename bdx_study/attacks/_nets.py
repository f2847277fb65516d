"""Small image-to-image and image-to-vector networks the generator-based attacks train (imported
when an attack builds them: the attack modules themselves import no torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True))


class UNetLite(nn.Module):
    """A two-level encoder-decoder (H, W divisible by 4) with skip connections; raw outputs."""

    def __init__(self, cin: int, cout: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.e1 = nn.Sequential(_conv(cin, w), _conv(w, w))
        self.e2 = nn.Sequential(nn.MaxPool2d(2), _conv(w, 2 * w), _conv(2 * w, 2 * w))
        self.mid = nn.Sequential(nn.MaxPool2d(2), _conv(2 * w, 2 * w))
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.d2 = _conv(4 * w, w)
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.d1 = _conv(2 * w, w)
        self.out = nn.Conv2d(w, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.e1(x)
        e2 = self.e2(e1)
        m = self.mid(e2)
        d2 = self.d2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.d1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)  # type: ignore[no-any-return]


class Decoder(nn.Module):
    """Image -> ``bits`` logits (ISSBA's secret decoder)."""

    def __init__(self, cin: int, bits: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(cin, w, 3, 2, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, 2, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * w, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, bits),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class SecretEncoder(nn.Module):
    """(image, secret bits) -> residual in [-amplitude, amplitude]: the secret goes through a
    dense layer to a (4, H/4, W/4) map, is upsampled to H x W, concatenated with the image and
    fed to a small U-Net (plus a 1x1 path from the secret map alone) whose output is squashed by
    amplitude * tanh."""

    def __init__(self, shape: tuple[int, int, int], bits: int, width: int, amplitude: float) -> None:
        super().__init__()
        c, h, w = shape
        self.hw = (h, w)
        self.amplitude = amplitude
        self.dense = nn.Linear(bits, 4 * (h // 4) * (w // 4))
        self.unet = UNetLite(c + 4, c, width)
        self.direct = nn.Conv2d(4, c, 1)  # a secret-only path: the decoder has a signal from the first step

    def forward(self, x: Tensor, secret: Tensor) -> Tensor:
        h, w = self.hw
        s = self.dense(secret * 2 - 1).view(-1, 4, h // 4, w // 4)
        s = F.interpolate(s, size=(h, w), mode="nearest").expand(x.shape[0], -1, -1, -1)
        return self.amplitude * torch.tanh(self.unet(torch.cat([x, s], dim=1)) + self.direct(s))
