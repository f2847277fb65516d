"""MLflow tracking from the Tune driver: one parent run per study, a nested run per trial and
per victim. Trials never talk to MLflow, so the store has a single writer (SQLite is safe) and
workers on other nodes need no tracking credentials.

Runs are found again by tags (``bdx.study``, ``bdx.trial_id``, ``bdx.victim_id``), so a resumed
study reuses its parent run and never duplicates a finished trial's run. If the tracking server
is unreachable, the study goes on (results are in Parquet) and a warning says so.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray import tune

log = logging.getLogger("bdx_study")

PARENT_TAG = "mlflow.parentRunId"


def resolve_tracking_uri(uri: str | None, cwd: Path | None = None) -> str:
    """An absolute tracking URI: trials and restored drivers may run in other directories.
    ``None`` means MLflow's default (``sqlite:///mlflow.db`` in the working directory)."""
    if uri is None:
        uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri.removeprefix("sqlite:///")
        uri = "sqlite:///" + str(((cwd or Path.cwd()) / rel).resolve())
    return uri


def ui_command(uri: str) -> str:
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --port 5000"
    return f"open {uri}"


def runs_link(uri: str, experiment_id: str) -> str:
    base = "http://127.0.0.1:5000" if uri.startswith("sqlite:") else uri.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


class StudyTracker:
    """Thin wrapper over MlflowClient for one study's runs."""

    def __init__(self, tracking_uri: str, experiment: str, study: str) -> None:
        self.uri = tracking_uri
        self.experiment_name = experiment
        self.study = study
        self._client: MlflowClient | None = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None

    def __getstate__(self) -> dict[str, Any]:  # the client is rebuilt after unpickling (resume)
        d = dict(self.__dict__)
        d["_client"] = None
        return d

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    def start(self, params: dict[str, Any], description: str = "") -> str:
        """Create (or find, on resume) the experiment and the study's parent run."""
        exp = self.client.get_experiment_by_name(self.experiment_name)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment_name)
        found = self._find({"bdx.study": self.study, "bdx.kind": "study"})
        if found:
            self.parent_run_id = found
            self.client.update_run(found, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.study,
                tags={"bdx.study": self.study, "bdx.kind": "study", "mlflow.note.content": description},
            )
            self.parent_run_id = run.info.run_id
            self.client.log_batch(self.parent_run_id, params=_params(params))
        return self.parent_run_id

    def _find(self, tags: dict[str, str]) -> str | None:
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=flt, max_results=1)  # type: ignore[list-item]
        return runs[0].info.run_id if runs else None

    def child_run(self, kind: str, key: str, name: str, params: dict[str, Any]) -> tuple[str, bool]:
        """(run id, created now) of the nested run for a trial or victim with id ``key``."""
        tag = f"bdx.{kind}_id"
        found = self._find({"bdx.study": self.study, tag: key})
        if found:
            return found, False
        run = self.client.create_run(
            self.experiment_id,  # type: ignore[arg-type]
            run_name=name,
            tags={PARENT_TAG: self.parent_run_id or "", "bdx.study": self.study, "bdx.kind": kind, tag: key},
        )
        self.client.log_batch(run.info.run_id, params=_params(params))
        return run.info.run_id, True

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        items = [Metric(_key(k), float(v), 0, 0) for k, v in metrics.items() if _finite(v)]
        for i in range(0, len(items), 900):
            self.client.log_batch(run_id, metrics=items[i : i + 900])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if path.is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def finish(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))


def _key(k: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in k)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _params(params: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(_key(k), str(list(v) if isinstance(v, tuple) else v)[:6000]) for k, v in params.items()]


class MlflowStudyCallback(tune.Callback):
    """Driver-side Tune callback: a nested MLflow run per trial, params named as in the YAML,
    per-victim and aggregate metrics, the per-sample scores and the confidence-plane plot."""

    def __init__(self, tracker: StudyTracker, fixed_params: dict[str, Any], total_trials: int) -> None:
        self.tracker = tracker
        self.fixed_params = fixed_params
        self.total = total_trials
        self.done = 0
        self._runs: dict[str, str] = {}

    def _safe(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # tracking must never kill the study: Parquet keeps the results
            warnings.warn(f"MLflow {what} failed ({type(e).__name__}: {e}); results stay in Parquet", stacklevel=2)
            return None

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        params = {**self.fixed_params, **trial.config}
        got = self._safe(
            "run creation", self.tracker.child_run, "trial", trial.trial_id, f"trial-{trial.trial_id}", params
        )
        if got:
            self._runs[trial.trial_id] = got[0]

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.done += 1
        result = trial.last_result or {}
        run_id = self._runs.get(trial.trial_id)
        if run_id is not None:
            metrics = {
                k: v
                for k, v in result.items()
                if _finite(v) and ("/" in k or k in ("objective", "feasible", "trial_seconds", "time_total_s"))
            }

            def _log() -> None:
                self.tracker.log_metrics(run_id, metrics)
                self.tracker.log_artifact(run_id, Path(result.get("scores_path", "")), "scores")
                self.tracker.log_artifact(run_id, Path(result.get("plot_path", "")), "plots")
                self.tracker.finish(run_id, ok=True)

            self._safe("logging", _log)
        obj = result.get("objective", float("nan"))
        print(
            f"[bdx-study] trial {self.done}/{self.total} {trial.trial_id} finished: objective {obj:.4f}"
            f"{'' if result.get('feasible', 1.0) else ' (infeasible)'}  params "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in trial.config.items()),
            flush=True,
        )

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        run_id = self._runs.get(trial.trial_id)
        if run_id is not None:
            self._safe("logging", self.tracker.finish, run_id, False)
        print(f"[bdx-study] trial {trial.trial_id} failed (see Ray's error above)", flush=True)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
