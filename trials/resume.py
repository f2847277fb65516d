"""Whether a launch starts a study or resumes one: refuse to start over an existing study without
``--resume``, to resume what cannot be restored, or to resume a study whose file changed."""

from __future__ import annotations

import os
from pathlib import Path

from bdx_study.space import SpaceError, StudySpec, load_space


def refuse_resume_elsewhere(spec: StudySpec, source: str | os.PathLike[str] | None) -> None:
    """``--resume`` from another folder than the launch's: a relative study.storage is resolved
    against the working folder, so the study is not where the command looks. Where it exists
    beside the study file (the launch ran from there), refuse before writing anything, saying
    where it looked and where the study is."""
    study_dir = spec.study_dir
    if source is None or (study_dir / "study.json").exists() or (study_dir / "tune").exists():
        return
    base = Path(source).resolve().parent
    beside = spec.storage_root(base=base) / "studies" / spec.study.name
    if beside != study_dir and ((beside / "study.json").exists() or (beside / "tune").exists()):
        raise SpaceError(
            f"--resume: no study {spec.study.name!r} at {study_dir} (study.storage {spec.study.storage!r} is resolved "
            f"against the working folder {Path.cwd()}), but there is one at {beside}: run the command from {base}, "
            "or give study.storage as an absolute path"
        )


def decide_resume(spec: StudySpec, resume: bool) -> bool:
    """Refuse to start over an existing study without --resume, or to resume what cannot be
    restored; a --resume with nothing to resume starts the study."""
    from ray import tune

    study_dir = spec.study_dir
    tune_dir = study_dir / "tune"
    exists = tune_dir.exists() or (study_dir / "study.json").exists()
    if exists and not resume:
        raise SpaceError(
            f"study {spec.study.name!r} already exists at {study_dir}; pass --resume to continue it, "
            "or change study.name (or delete that folder) to start over"
        )
    if resume and not exists:
        where = f"study.storage {spec.study.storage!r} is resolved against the working folder {Path.cwd()}"
        print(f"[bdx-study] nothing to resume at {study_dir} ({where}); starting the study", flush=True)
        return False
    if resume:
        _check_same_study(spec, study_dir)
        if tune_dir.exists() and not tune.Tuner.can_restore(str(tune_dir)):
            raise SpaceError(
                f"{tune_dir}: Ray Tune's state cannot be restored, so --resume cannot continue this study without "
                "mixing two searches in its tables; launch it under a new study.name (its victims are reused)"
            )
    return resume


def _check_same_study(spec: StudySpec, study_dir: Path) -> None:
    """A resumed study must be the one that was launched (victims, detectors, search unchanged)."""
    stored = study_dir / "study.yaml"
    if not stored.is_file():
        return
    before = load_space(stored)
    changed = [
        s for s in ("victims", "detectors", "protocol", "search", "data") if getattr(before, s) != getattr(spec, s)
    ]
    if changed:
        raise SpaceError(
            f"{stored}: the study file differs from the one this study was launched with in "
            f"{', '.join(changed)}; resume it with the original file, or give the new one another study.name"
        )
