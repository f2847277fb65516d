"""Parquet tables (pyarrow) of a study, written atomically; schemas in :mod:`bdx_study.schema`.

Each trial writes its own part files (``parts/scores/<trial_id>.parquet`` first, then
``parts/trials/<trial_id>.parquet``); a retried trial replaces its own parts, so every finished
trial appears exactly once. ``consolidate`` merges parts into ``trials.parquet`` and
``scores.parquet`` for convenience; readers may read either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bdx_study._io import atomic_path
from bdx_study.schema import rows_to_table, trials_schema, victims_schema


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` so readers see the old file or the whole new one, never half."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


class StudyTables:
    """The Parquet tables of one study, under ``<study dir>/tables``."""

    def __init__(self, study_dir: Path) -> None:
        self.root = Path(study_dir) / "tables"

    def part(self, kind: str, trial_id: str) -> Path:
        return self.root / "parts" / kind / f"{trial_id}.parquet"

    def write_trial(self, trial_id: str, rows: list[dict[str, Any]], scores: pa.Table) -> None:
        # scores first: a trial counts as finished once its row part exists
        write_table_atomic(scores, self.part("scores", trial_id))
        write_table_atomic(rows_to_table(rows, trials_schema()), self.part("trials", trial_id))

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
        write_table_atomic(rows_to_table(rows, victims_schema()), self.root / "victims.parquet")

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
