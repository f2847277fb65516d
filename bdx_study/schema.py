"""The Parquet schemas of a study's tables, declared in one place (never inferred from a row).

- ``trials``: one row per trial x victim: ids, the detector family and its parameters (a column
  per parameter of every registered family, named as in the YAML, plus the exact parameters as
  JSON), the protocol settings, every metric of the evaluation split and (``selection_``
  prefixed) of the selection split, cost, and the keys of the fitted components the row used;
- ``scores``: one row per trial x victim x scored input (split, labels, predictions, score, flag
  and each family's extra columns);
- ``refits`` and ``refit_scores``: the same two tables for refits of the best configs (fresh
  seeds and fresh draws of D_c), ``refit_of`` naming the trial; a pruned trial (``search.pruning``)
  has rows for the victims it evaluated, marked ``pruned``, each with its ``victim_step``;
- ``victims``: one row per victim (config, clean accuracy, attack success).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

import numpy as np
import pyarrow as pa

from bdx_study.configs import VictimConfig
from bdx_study.detectors import DETECTORS
from bdx_study.metrics import COST_METRICS, DETECTION_METRICS
from bdx_study.protocol import SAMPLE_COLUMNS, ProtocolConfig

SCHEMA_VERSION = "3"  # 3: pruning columns (older parts read with them null: not pruned)

VICTIM_FIELDS = [
    pa.field("victim_id", pa.string()),
    pa.field("victim_name", pa.string()),
    pa.field("dataset", pa.string()),
    pa.field("architecture", pa.string()),
    pa.field("attack", pa.string()),
    pa.field("poison_rate", pa.float64()),
    pa.field("victim_seed", pa.int64()),
    pa.field("victim_epochs", pa.int64()),
]


def victim_columns(v: VictimConfig) -> dict[str, Any]:
    """The victim's identity as table cells (trials, victims, MLflow params)."""
    return {
        "victim_id": v.key,
        "victim_name": v.name,
        "dataset": v.dataset,
        "architecture": v.architecture,
        "attack": v.attack.name,
        "poison_rate": float(v.attack.params.get("poison_rate", 0.0)),
        "victim_seed": v.seed,
        "victim_epochs": v.training.epochs,
    }


def arrow_type(annotation: Any) -> pa.DataType:
    """The column type of a config field: bool, int64, float64, or string (text, literals, and
    lists and mappings as JSON text)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"no column type for {annotation!r}")
        return arrow_type(inner[0])
    if annotation is bool:
        return pa.bool_()
    if annotation is int:
        return pa.int64()
    if annotation is float:
        return pa.float64()
    if annotation is str or origin is Literal or origin in (tuple, list, dict):
        return pa.string()
    raise TypeError(f"no column type for {annotation!r}")


def _config_fields(models: list[type[Any]], taken: set[str]) -> list[pa.Field]:
    """One column per field of ``models``; a name shared by two models must have one type."""
    out: dict[str, pa.DataType] = {}
    for model in models:
        for name, f in model.model_fields.items():
            t = arrow_type(f.annotation)
            if name in taken:
                raise TypeError(f"{model.__name__}.{name} collides with a fixed column of the trials table")
            if name in out and out[name] != t:
                raise TypeError(f"parameter {name!r} has two column types ({out[name]} and {t}); rename one")
            out[name] = t
    return [pa.field(k, t) for k, t in out.items()]


def _metric_fields() -> list[pa.Field]:
    names = [m.name for m in DETECTION_METRICS]
    names += sorted({d for cls in (DETECTORS.get(n) for n in DETECTORS.names()) for d in cls.diagnostics})
    return [pa.field(n, pa.float64()) for n in names] + [pa.field(f"selection_{n}", pa.float64()) for n in names]


def trials_schema() -> pa.Schema:
    head = [
        pa.field("study", pa.string()),
        pa.field("trial_id", pa.string()),  # a refit's own id: <trial id>-refit<r>
        pa.field("refit_of", pa.string()),  # refits only: the trial whose config is fitted again
        pa.field("refit_index", pa.int64()),  # refits only: r = 1..repeats (fresh seed and D_c draw)
        pa.field("detector", pa.string()),
        *VICTIM_FIELDS,
        pa.field("params", pa.string()),  # the family's exact parameters, JSON
    ]
    tail = [
        *_metric_fields(),
        *[pa.field(m.name, pa.float64()) for m in COST_METRICS],
        pa.field("finetune_images", pa.int64()),  # what the family fitted on
        pa.field("calibration_images", pa.int64()),  # what the threshold was calibrated on (before correct-only)
        pa.field("stages_fitted", pa.int64()),  # components this row fitted (0 = all found in the stage cache)
        pa.field("stage_keys", pa.string()),  # JSON {component: stage cache key}
        pa.field("fit_meta", pa.string()),  # JSON {component: fit metadata}
        pa.field("objective", pa.float64()),  # the trial's (a pruned trial's: over the victims it saw)
        pa.field("feasible", pa.bool_()),
        pa.field("pruned", pa.bool_()),  # the trial stopped early (search.pruning): never picked
        pa.field("victim_step", pa.int64()),  # this victim was the trial's n-th (1 = first evaluated)
        pa.field("victims_planned", pa.int64()),  # victims the trial would have evaluated
        pa.field("running_objective", pa.float64()),  # the trial's objective over its first victim_step victims
        pa.field("pruner_attrs", pa.string()),  # JSON: the Optuna pruner's records of the trial (its rungs)
        pa.field("trial_seconds", pa.float64()),
        pa.field("started_at", pa.float64()),
        pa.field("finished_at", pa.float64()),
        pa.field("node", pa.string()),
        pa.field("device", pa.string()),
        pa.field("gpu_ids", pa.string()),
    ]
    taken = {f.name for f in head + tail}
    protocol = _config_fields([ProtocolConfig], taken)
    families = [DETECTORS.get(n).Params for n in DETECTORS.names()]
    params = _config_fields(families, taken | {f.name for f in protocol})
    return _versioned(pa.schema(head + protocol + params + tail))


def scores_schema() -> pa.Schema:
    types_ = {
        "split": pa.string(),
        "triggered": pa.bool_(),
        "sample_index": pa.int64(),
        "label": pa.int64(),
        "attack_label": pa.int64(),
        "pred": pa.int64(),
        "score": pa.float64(),
        "flagged": pa.bool_(),
    }
    extras = sorted({e for n in DETECTORS.names() for e in DETECTORS.get(n).schema_columns()} - set(types_))
    fields = [pa.field("trial_id", pa.string()), pa.field("victim_id", pa.string()), pa.field("detector", pa.string())]
    fields += [pa.field(c, types_[c]) for c in SAMPLE_COLUMNS] + [pa.field(e, pa.float64()) for e in extras]
    return _versioned(pa.schema(fields))


def victims_schema() -> pa.Schema:
    return _versioned(
        pa.schema(
            [
                *VICTIM_FIELDS,
                pa.field("clean_acc", pa.float64()),
                pa.field("attack_success", pa.float64()),
                pa.field("train_seconds", pa.float64()),
                pa.field("weights_sha256", pa.string()),
                pa.field("cache_path", pa.string()),
            ]
        )
    )


def _versioned(schema: pa.Schema) -> pa.Schema:
    return schema.with_metadata({"bdx.schema_version": SCHEMA_VERSION})


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows of scalars to a table of ``schema``; a key the schema does not declare is an error."""
    names = set(schema.names)
    for r in rows:
        unknown = set(r) - names
        if unknown:
            raise KeyError(f"columns not in the declared schema: {sorted(unknown)}")
    return pa.Table.from_pylist(rows, schema=schema)


def scores_table(trial_id: str, victim_id: str, detector: str, samples: Mapping[str, np.ndarray]) -> pa.Table:
    """The per-sample rows of one trial on one victim (missing extras are null)."""
    schema = scores_schema()
    n = len(samples["score"])
    ids = {"trial_id": [trial_id] * n, "victim_id": [victim_id] * n, "detector": [detector] * n}
    cols = []
    for f in schema:
        if f.name in ids:
            cols.append(pa.array(ids[f.name], f.type))
        elif f.name in samples:
            v = samples[f.name]
            cols.append(pa.array(v.tolist() if v.dtype == object else v, f.type))
        else:
            cols.append(pa.nulls(n, f.type))
    unknown = set(samples) - set(schema.names)
    if unknown:
        raise KeyError(f"sample columns not in the declared schema: {sorted(unknown)}")
    return pa.Table.from_arrays(cols, schema=schema)
