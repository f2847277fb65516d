"""Parquet tables (pyarrow) of a study, written atomically; schemas in :mod:`bdx_study.schema`.

Each trial writes its own part files (``parts/scores/<trial_id>.parquet`` first, then
``parts/trials/<trial_id>.parquet``); a retried trial replaces its own parts, so every finished
trial appears exactly once. A trial counts as finished only while both of its parts are
readable: an unreadable part (a truncated file, a corrupt page) is moved aside to
``parts/quarantine/`` and the trial is run again by the next launch. ``consolidate`` merges parts
into ``trials.parquet`` and ``scores.parquet`` for convenience; readers may read either.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bdx_study._io import atomic_path
from bdx_study.schema import rows_to_table, trials_schema, victims_schema

KINDS = ("trials", "scores")
# Row tables and their per-sample tables: the search's trials, refits of the best configs, and
# each nested fold's picks measured on its held-out victims.
SCORES_OF = {"trials": "scores", "refits": "refit_scores", "heldout": "heldout_scores"}


class TableError(OSError):
    """A Parquet file that cannot be read; the message names it."""


def _read(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        if columns is not None:
            part = pq.ParquetFile(path)
            return part.read(columns=[c for c in columns if c in part.schema_arrow.names])
        return pq.read_table(path)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise TableError(f"{path}: unreadable Parquet ({e})") from None


def _footer(path: Path) -> None:
    try:
        pq.read_metadata(path)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise TableError(f"{path}: unreadable Parquet ({e})") from None


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

    def write_trial(self, trial_id: str, rows: list[dict[str, Any]], scores: pa.Table, kind: str = "trials") -> None:
        """A trial's (or refit's, or held-out evaluation's: ``kind``) rows and per-sample scores:
        scores first, so it counts as finished once its row part exists."""
        write_table_atomic(scores, self.part(SCORES_OF[kind], trial_id))
        write_table_atomic(rows_to_table(rows, trials_schema()), self.part(kind, trial_id))

    def read_part(self, kind: str, trial_id: str) -> pa.Table:
        return _read(self.part(kind, trial_id))

    def finished_trials(self, full: bool = False, kind: str = "trials") -> set[str]:
        """Trials (or refits, held-out evaluations: ``kind``) whose two parts are readable (the
        rows part always read whole; the scores part whole only with ``full``, else its footer).
        Unreadable parts are quarantined."""
        kinds = (kind, SCORES_OF[kind])
        folder = self.root / "parts" / kinds[0]
        if not folder.is_dir():
            return set()
        out = set()
        for p in sorted(folder.glob("*.parquet")):
            trial_id = p.stem
            try:
                _read(p)
                scores = self.part(kinds[1], trial_id)
                _read(scores) if full else _footer(scores)
            except (TableError, FileNotFoundError) as e:
                self.quarantine(trial_id, str(e), kinds)
                continue
            out.add(trial_id)
        return out

    def counts(self) -> dict[str, int]:
        """How many trials, refits and held-out evaluations have stored rows (by kind, as
        :data:`SCORES_OF` names them): what an analysis of the tables is made from."""
        return {kind: len(list((self.root / "parts" / kind).glob("*.parquet"))) for kind in SCORES_OF}

    def quarantine(self, trial_id: str, why: str, kinds: tuple[str, ...] = KINDS) -> None:
        """Move a trial's parts aside (nothing is deleted): the trial is no longer finished."""
        dest = self.root / "parts" / "quarantine"
        moved = False
        for kind in kinds:
            src = self.part(kind, trial_id)
            if src.exists():
                dest.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(src, dest / f"{kind}-{trial_id}-{time.time_ns()}.parquet")
                    moved = True
                except FileNotFoundError:  # another process moved it first
                    pass
        if moved:
            print(
                f"[bdx-study] WARNING: trial {trial_id}'s stored result is unreadable ({why}); moved to {dest}, "
                "the trial runs again",
                flush=True,
            )

    def read(self, kind: str, columns: list[str] | None = None) -> pa.Table:
        """All rows of ``kind`` ('trials' or 'scores') from the part files (only ``columns``,
        those of them a part has, when given)."""
        files = sorted((self.root / "parts" / kind).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(
                f"{self.root.parent}: no finished {kind} yet (no {kind} tables under {self.root / 'parts' / kind}); "
                "run `bdx-study launch --space <study file>` first, or wait for a trial to finish"
            )
        tables = [_read(f, columns) for f in files]
        return pa.concat_tables(tables, promote_options="permissive")

    def write_victims(self, rows: list[dict[str, Any]]) -> None:
        write_table_atomic(rows_to_table(rows, victims_schema()), self.root / "victims.parquet")

    def consolidate(self) -> dict[str, Path]:
        out = {}
        for kind in KINDS:
            try:
                table = self.read(kind)
            except FileNotFoundError:
                continue
            out[kind] = self.root / f"{kind}.parquet"
            write_table_atomic(table, out[kind])
        return out
