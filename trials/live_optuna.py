"""The study's ``optuna.db`` written while the search runs, so optuna-dashboard follows it live:
a trial appears RUNNING when Tune starts it (in the order trials start, with its searched
params), gains an intermediate value after each victim (the running objective), and ends
COMPLETE, PRUNED or FAIL with what ``analyze`` would give it (the objective on the selection
split, Optuna's constraint for clean-accuracy feasibility, user attributes named by split:
:func:`bdx_study.analysis.searches.optuna_trials`). A launch first rebuilds the file from the
tables, so a resumed study shows every finished trial once; ``analyze`` rebuilds it whole again.

Writing it must never stop the study: a failure is reported once and the file is left alone
until the next launch (the tables keep everything; ``analyze`` rebuilds it).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from bdx_study._io import short_error
from bdx_study.space import StudySpec
from bdx_study.tables import StudyTables


class LiveOptuna:
    """One study's ``<study>/optuna.db``, written by the driver (a single writer; readers such as
    optuna-dashboard are safe with SQLite). Pickled with Tune's callbacks: it keeps only paths
    and the ids of the Optuna trials it made, by bdx trial id."""

    def __init__(self, spec: StudySpec, study_dir: Path) -> None:
        self.spec = spec
        self.path = study_dir / "optuna.db"
        self.study_dir = study_dir
        self.ids: dict[str, int] = {}  # bdx trial id -> Optuna trial id (RUNNING ones)
        self.broken = False
        self._open: tuple[tuple[int, int], Any] | None = None  # (the file's device and inode, its storage)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": None}

    def _storage(self) -> Any:
        """The file's storage, opened again when the file was replaced (``analyze`` rebuilds it)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        opened = getattr(self, "_open", None)
        try:
            st = os.stat(self.path)
            key: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            key = None
        if opened is None or key is None or opened[0] != key:
            storage = optuna.storages.RDBStorage(f"sqlite:///{self.path}")
            st = os.stat(self.path)
            opened = self._open = ((st.st_dev, st.st_ino), storage)
        return opened[1]

    def _safe(self, fn: Any, *args: Any) -> None:
        if self.broken:
            return
        try:
            fn(*args)
        except Exception as e:
            self.broken = True
            print(
                f"[bdx-study] WARNING: optuna.db is no longer written live ({short_error(e)}); the study goes on, "
                "and `bdx-study analyze` rebuilds it from the tables",
                flush=True,
            )

    def rebuild(self) -> None:
        """The file rebuilt from the trials stored so far (a launch's start; a resume keeps them)."""
        self._safe(self._rebuild)

    def _rebuild(self) -> None:
        from bdx_study.analysis.searches import write_optuna_study

        self.ids = {}
        self.broken = False
        tables = StudyTables(self.study_dir)
        try:
            df = tables.read("trials").to_pandas()
        except FileNotFoundError:
            df = None
        if df is None or df.empty:
            self.path.unlink(missing_ok=True)
            return
        write_optuna_study(df, self.spec, self.path)

    def started(self, trial_id: str, config: dict[str, Any]) -> None:
        self._safe(self._started, trial_id, config)

    def _started(self, trial_id: str, config: dict[str, Any]) -> None:
        import optuna

        family = str(config["detector"])
        dists = self.spec.optuna_space(family)
        if not dists or trial_id in self.ids:
            return
        storage = self._storage()
        study_id = self._study_id(storage, family)
        params = {k: config[k] for k in dists if k in config}
        trial = optuna.trial.create_trial(
            state=optuna.trial.TrialState.RUNNING,
            params=params,
            distributions={k: dists[k] for k in params},
            user_attrs={"trial_id": trial_id},
        )
        trial.datetime_start = datetime.datetime.now()
        self.ids[trial_id] = storage.create_new_trial(study_id, template_trial=trial)

    def _study_id(self, storage: Any, family: str) -> int:
        """The family's study in the file (made, its objective named, if the file has none yet)."""
        import optuna

        from bdx_study.analysis.searches import direction, name_the_objective, study_name

        name = study_name(self.spec, family)
        way = direction(self.spec)
        study = optuna.create_study(study_name=name, storage=storage, direction=way, load_if_exists=True)
        if not study.metric_names:
            name_the_objective(study, self.spec)
        return int(storage.get_study_id_from_name(name))

    def progress(self, trial_id: str, step: int, value: float) -> None:
        """The running objective after ``step`` victims."""
        if trial_id in self.ids:
            self._safe(lambda: self._storage().set_trial_intermediate_value(self.ids[trial_id], step, value))

    def finished(self, trial_id: str, family: str) -> None:
        """The trial as ``analyze`` shows it, from its stored rows (nothing stored: FAIL)."""
        if trial_id in self.ids:
            self._safe(self._finished, trial_id, family)

    def failed(self, trial_id: str) -> None:
        if trial_id in self.ids:
            oid = self.ids.pop(trial_id)
            self._safe(lambda: self._end(self._storage(), oid, "FAIL", None))

    def _finished(self, trial_id: str, family: str) -> None:
        from bdx_study.analysis.searches import optuna_trials

        storage, oid = self._storage(), self.ids.pop(trial_id)
        try:  # this trial's rows only (every part of the study would be read again at each trial's end)
            rows = StudyTables(self.study_dir).read_part("trials", trial_id)
        except OSError:  # not stored (FileNotFoundError) or unreadable (TableError)
            self._end(storage, oid, "FAIL", None)
            return
        built = optuna_trials(rows.to_pandas(), self.spec, family)[0]
        for key, value in built.user_attrs.items():
            storage.set_trial_user_attr(oid, key, value)
        for key, value in built.system_attrs.items():  # Optuna's constraints live here
            storage.set_trial_system_attr(oid, key, value)
        for step, value in built.intermediate_values.items():
            storage.set_trial_intermediate_value(oid, step, value)
        self._end(storage, oid, built.state.name, built.values)

    @staticmethod
    def _end(storage: Any, oid: int, state: str, values: list[float] | None) -> None:
        import optuna

        storage.set_trial_state_values(oid, optuna.trial.TrialState[state], values)
