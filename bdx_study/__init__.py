"""bdx-study: hyperparameter and ablation studies of the BaDExpert backdoor-input detector.

The library (datasets, architectures, attacks, victims, detector families, the evaluation
protocol, the stage cache, metrics, detector bundles);
trials (``bdx_study.trials``) and analysis (``bdx_study.analysis``) build on it, never the
other way round.
"""

from bdx_study.detector import Detection, Detector

__all__ = ["Detection", "Detector", "__version__"]
__version__ = "0.1.0"
