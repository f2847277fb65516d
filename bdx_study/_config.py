"""The base of every typed config: unknown keys and reassignment are errors, non-finite numbers
are refused, and a config converts to and from flat table cells (Parquet columns, MLflow params)
under the same names as in the YAML."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from typing_extensions import Self

Precision = Literal["fp32", "bf16"]  # how training arithmetic runs (victims, BaDExpert's finetuning)
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RowModel(StrictModel):
    """A config whose fields are table cells: lists become JSON text, e.g. "[2, 4, 6, 8]"."""

    def to_row(self) -> dict[str, Any]:
        return {k: json.dumps(list(v)) if isinstance(v, tuple | list) else v for k, v in self.model_dump().items()}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Self:
        """Inverse of :meth:`to_row` for a table row (extra columns ignored; NaN cells = null)."""
        vals: dict[str, Any] = {}
        for k in cls.model_fields:
            if k not in row:
                continue
            v = row[k]
            if hasattr(v, "item"):
                v = v.item()
            if isinstance(v, float) and math.isnan(v):
                v = None
            elif isinstance(v, str) and v.startswith("["):
                v = json.loads(v)
            if v is None and cls.model_fields[k].default is not None:
                continue  # a column this row does not use: keep the default
            vals[k] = v
        return cls.model_validate(vals)
