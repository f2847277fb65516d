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


def _cell(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return json.dumps(list(v))
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return v


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys, the names a study file's nested settings go by
    (a committee's ``members.badexpert.unlearn_lr``); other values as they are."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(values: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten`: dotted keys back to nested mappings."""
    out: dict[str, Any] = {}
    for key, v in values.items():
        *path, last = key.split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return out


class RowModel(StrictModel):
    """A config whose fields are table cells: lists and mappings become JSON text, e.g. "[2, 4, 6, 8]"."""

    def to_row(self) -> dict[str, Any]:
        return {k: _cell(v) for k, v in self.model_dump().items()}

    def to_params(self) -> dict[str, Any]:
        """Flat name -> value cells for MLflow params: nested settings under dotted names, as in
        the study file's search space (a committee's ``members.ted.ted_pool_per_class``)."""
        return {k: _cell(v) for k, v in flatten(self.model_dump()).items()}

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
            elif isinstance(v, str) and v[:1] in ("[", "{"):
                v = json.loads(v)
            if v is None and cls.model_fields[k].default is not None:
                continue  # a column this row does not use: keep the default
            vals[k] = v
        return cls.model_validate(vals)
