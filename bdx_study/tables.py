"""Parquet tables (pyarrow) of a study, written atomically (temporary file + rename).

- ``trials``: one row per trial x victim: ids, every defense hyperparameter (same names as the
  YAML and MLflow params), the victim's config columns, and every per-victim metric;
- ``scores``: one row per trial x victim x scored input (split, labels, predictions, the
  expert's and auxiliary model's confidences, score, flag);
- ``victims``: one row per victim (config, clean accuracy, attack success).

Each trial writes its own part files (``parts/trials/<trial_id>.parquet``,
``parts/scores/<trial_id>.parquet``); a retried trial replaces its own parts, so every finished
trial appears exactly once. ``consolidate`` merges parts into ``trials.parquet`` and
``scores.parquet`` for convenience; readers may read either.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "1"


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` so readers see the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rows_to_table(rows: list[dict[str, Any]], metadata: dict[str, str] | None = None) -> pa.Table:
    """Rows of flat scalars to a table; numeric metrics become float64 columns."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    cols = {}
    for k in keys:
        vals = [r.get(k) for r in rows]
        if all(isinstance(v, int | float) and not isinstance(v, bool) or v is None for v in vals) and any(
            isinstance(v, float) for v in vals
        ):
            cols[k] = pa.array([None if v is None else float(v) for v in vals], pa.float64())
        else:
            cols[k] = pa.array(vals)
    table = pa.table(cols)
    meta = {"bdx.schema_version": SCHEMA_VERSION, **(metadata or {})}
    return table.replace_schema_metadata(meta)


class StudyTables:
    """The Parquet tables of one study, under ``<study dir>/tables``."""

    def __init__(self, study_dir: Path) -> None:
        self.root = Path(study_dir) / "tables"

    def part(self, kind: str, trial_id: str) -> Path:
        return self.root / "parts" / kind / f"{trial_id}.parquet"

    def write_trial(self, trial_id: str, rows: list[dict[str, Any]], scores: pa.Table) -> None:
        # scores first: a trial counts as finished once its row part exists
        write_table_atomic(scores, self.part("scores", trial_id))
        write_table_atomic(rows_to_table(rows), self.part("trials", trial_id))

    def read_part(self, kind: str, trial_id: str) -> pa.Table:
        return pq.read_table(self.part(kind, trial_id))

    def finished_trials(self) -> set[str]:
        folder = self.root / "parts" / "trials"
        return {p.stem for p in folder.glob("*.parquet")} if folder.is_dir() else set()

    def read(self, kind: str) -> pa.Table:
        """All rows of ``kind`` ('trials' or 'scores') from the part files."""
        files = sorted((self.root / "parts" / kind).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no {kind} tables under {self.root / 'parts' / kind}")
        tables = [pq.read_table(f) for f in files]
        return pa.concat_tables(tables, promote_options="permissive")

    def write_victims(self, rows: list[dict[str, Any]]) -> None:
        write_table_atomic(rows_to_table(rows), self.root / "victims.parquet")

    def consolidate(self) -> dict[str, Path]:
        out = {}
        for kind in ("trials", "scores"):
            try:
                table = self.read(kind)
            except FileNotFoundError:
                continue
            out[kind] = self.root / f"{kind}.parquet"
            write_table_atomic(table, out[kind])
        return out
