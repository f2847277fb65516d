"""bdx-study: hyperparameter and ablation studies of the BaDExpert backdoor-input detector.

The library (datasets, architectures, attacks, victims, detector families, the evaluation
protocol, the stage cache, metrics, detector bundles);
trials (``bdx_study.trials``) and analysis (``bdx_study.analysis``) build on it, never the
other way round.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Detection", "Detector", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:  # the bundle loader imports torch: only when asked for
    if name in ("Detection", "Detector"):
        from bdx_study import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'bdx_study' has no attribute {name!r}")
