"""MLflow "models from code" entry for an exported detector bundle (no pickled objects).

``mlflow.pyfunc.load_model(uri).predict(x)`` takes a float array (N, C, H, W) in [0, 1] and
returns a DataFrame with the model's prediction, the flag and the score per input.
"""

from __future__ import annotations

import warnings
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

# predict takes an array, not the list-of-records MLflow's type-hint validation is built for.
# MLflow raises its notice about that under simplefilter("once") when the class is created, which
# overrides any "ignore" filter: drop it at display time, for the class definition only.
_show = warnings.showwarning


def _without_type_hint_notice(message: Any, *args: Any, **kwargs: Any) -> None:
    if "Add type hints to the `predict` method" not in str(message):
        _show(message, *args, **kwargs)


warnings.showwarning = _without_type_hint_notice


class DetectorModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from bdx_study.detector import Detector

        self.detector = Detector.load(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # no hints: MLflow infers none
        x = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
        if x.ndim == 2:  # flattened rows, e.g. from a DataFrame
            x = x.reshape((len(x), *self.detector.input_shape))
        d = self.detector.detect(x.astype(np.float32))
        return pd.DataFrame({"prediction": d.prediction, "flagged": d.flagged, "score": d.score})


warnings.showwarning = _show
mlflow.models.set_model(DetectorModel())
