"""The corruption types of TeCo's torch backend and their severity tables, without torch.

Data only: TeCo's parameter model (``teco.py``) checks corruption names against
:func:`corruption_names` without importing torch; ``_corruptions.py`` implements one function
per name (and checks, on import, that it implements exactly these, in this order). The two
tables are described there.
"""

from __future__ import annotations

from typing import Any

SEVERITIES = 5

# Severity 1..5 settings per corruption. Pixel sizes at 32x32; see each function for the fields.
TABLES: dict[str, dict[str, list[Any]]] = {
    "imagenet_c": {
        "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],
        "shot_noise": [60.0, 25.0, 12.0, 5.0, 3.0],
        "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],
        "speckle_noise": [0.15, 0.2, 0.35, 0.45, 0.6],
        "gaussian_blur": [1.0, 2.0, 3.0, 4.0, 6.0],
        "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1.0, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
        "defocus_blur": [(3.0, 0.1), (4.0, 0.5), (6.0, 0.5), (8.0, 0.5), (10.0, 0.5)],
        "motion_blur": [(10.0, 3.0), (15.0, 5.0), (15.0, 8.0), (15.0, 12.0), (20.0, 15.0)],
        "zoom_blur": [(1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)],
        "fog": [(1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)],
        "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],
        "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
        "saturate": [(0.3, 0.0), (0.1, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.2)],
        "jpeg_compression": [25, 18, 15, 10, 7],
        "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
        # (displacement, field sigma, affine jitter) in pixels at 32x32: 250 a x 0.005 x 32, 0.01 x 32, none
        "elastic_transform": [(2.0, 0.32, 0.0), (2.6, 0.32, 0.0), (3.4, 0.32, 0.0), (4.0, 0.32, 0.0), (4.8, 0.32, 0.0)],
    },
    "cifar10_c": {
        "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
        "shot_noise": [500.0, 250.0, 100.0, 75.0, 50.0],
        "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
        "speckle_noise": [0.06, 0.1, 0.12, 0.16, 0.2],
        "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],
        "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
        "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)],
        "motion_blur": [(6.0, 1.0), (6.0, 1.5), (6.0, 2.0), (8.0, 2.0), (9.0, 2.5)],
        "zoom_blur": [(1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)],
        "fog": [(0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)],
        "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
        "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
        "saturate": [(0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)],
        "jpeg_compression": [80, 65, 58, 50, 40],
        "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
        # (displacement, field sigma, affine jitter) = 32 x (0, 0, .08), (.05, .2, .07), (.08, .06, .06), ...
        "elastic_transform": [
            (0.0, 0.0, 2.56),
            (1.6, 6.4, 2.24),
            (2.56, 1.92, 1.92),
            (3.2, 1.28, 1.6),
            (3.2, 0.96, 0.96),
        ],
    },
}


def corruption_names() -> list[str]:
    """The torch backend's corruption types, in table order (the default set's order; every table
    lists the same ones). Read when called: a corruption added to the tables is known at once."""
    return list(TABLES["imagenet_c"])
