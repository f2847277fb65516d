"""MLflow tracking from the Tune driver: one parent run per study, a nested run per trial and
per victim. Trials never talk to MLflow, so the store has a single writer (SQLite is safe) and
workers on other nodes need no tracking credentials.

A fresh launch creates a new parent run; a resume continues the parent run recorded in the
study's ``study.json``. Nested runs are found again by tags (``bdx.trial_id``, ``bdx.victim_id``)
under that parent, so a resumed study never duplicates a run. If the tracking server is
unreachable, the study goes on (results are in Parquet) and a warning says so; at the end of
every launch, :meth:`StudyTracker.sync` logs any finished trial that MLflow is missing.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune

from bdx_study._io import is_disk_full, short_error
from bdx_study.protocol import ProtocolConfig
from bdx_study.space import StudySpec
from bdx_study.tables import StudyTables

from .live_optuna import LiveOptuna

PARENT_TAG = "mlflow.parentRunId"
BEST_END = " (by the selection rule; opens the trial's run)\n\n"  # ends the study run's best-trial line
# Result keys logged as trial metrics besides the "<aggregate>/<metric>" and "<victim>/<metric>" ones.
TRIAL_SCALARS = ("objective", "feasible", "trial_seconds", "stages_fitted", "pruned", "victims_done", "victims_planned")


def children_filter(parent_run_id: str | None, kind: str | None = None, key: str | None = None) -> str:
    """MLflow filter for the runs nested under a study's parent run (optionally of one kind and id)."""
    flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    if kind is not None:
        flt += f" and tags.`bdx.kind` = '{kind}'"
        if key is not None:
            flt += f" and tags.`bdx.{kind}_id` = '{key}'"
    return flt


# MLflow's HTTP client retries for minutes by default; a study should notice an outage in seconds.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
OUTAGE_PAUSE_S = 30.0  # after a failed call, MLflow is left alone this long (the study does not wait on it)
for _k, _v in MLFLOW_HTTP_DEFAULTS.items():
    os.environ.setdefault(_k, _v)


def probe_tracking(uri: str, timeout: float = 5.0) -> None:
    """Raise (within ``timeout``) if the tracking store at ``uri`` cannot be reached."""
    if uri.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:  # noqa: S310 - http(s) only
            if r.status != 200:
                raise ConnectionError(f"{uri}/health answered {r.status}")
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder")


def resolve_tracking_uri(uri: str | None, cwd: Path | None = None) -> str:
    """An absolute tracking URI: trials and restored drivers may run in other directories.
    ``None`` means MLflow's default (``sqlite:///mlflow.db`` in the working directory)."""
    if uri is None:
        uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri.removeprefix("sqlite:///")
        uri = "sqlite:///" + str(((cwd or Path.cwd()) / rel).resolve())
    return uri


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite store (``mlartifacts/``
    beside the .db file), not in whatever folder the command happens to run in; a server
    decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def ui_command(uri: str) -> str:
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --port 5000"
    return f"open {uri}"


def runs_link(uri: str, experiment_id: str, mode: str = "max", study: str | None = None) -> str:
    """The MLflow UI's page of the study's trials that ran to the end (a pruned trial's objective
    covers only the victims it saw; a nested fold's trials searched a subset of the victims), best
    objective first, in the UI's model-training view (MLflow 3 opens experiments in its GenAI
    view). The UI reads the filter, the order and the view from the link, not the columns: each
    trial run's name carries its objective (:func:`trial_run_name`)."""
    base = "http://127.0.0.1:5000" if uri.startswith("sqlite:") else uri.rstrip("/")
    flt = "tags.`bdx.kind` = 'trial' and tags.`bdx.status` = 'complete' and tags.`bdx.fold` IS NULL"
    if study is not None:
        flt += f" and tags.`bdx.study` = '{study}'"  # study names are [A-Za-z0-9._-]: no quoting needed
    query = urllib.parse.urlencode(
        {
            "searchFilter": flt,
            "orderByKey": "metrics.`objective`",
            "orderByAsc": "false" if mode == "max" else "true",
            "workflowType": "machine_learning",
        },
        quote_via=urllib.parse.quote,
    )
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def trial_run_name(trial_id: str, result: dict[str, Any], selection_key: str) -> str:
    """A finished trial's run name, its objective as measured first (the UI shows names, cut to
    their first twenty-odd characters, not metric columns, unless the user adds them), then
    what kept it from the pick, then the trial: ``0.9898 badexpert-1d8ec7a5``, ``0.9402
    infeasible badexpert-47fd00cd``, ``0.9212 pruned 1/4 badexpert-33f85de1``."""
    value = result.get(selection_key)
    parts = [f"{value:.4f}" if _finite(value) else "undefined"]
    if result.get("pruned"):
        parts.append(f"pruned {int(result.get('victims_done', 0))}/{int(result.get('victims_planned', 0))}")
    elif not result.get("feasible", 1.0):
        parts.append("infeasible")
    return " ".join([*parts, f"{result.get('detector', 'trial')}-{trial_id}"])


def run_link(experiment_id: str, run_id: str) -> str:
    """A link to one run inside the MLflow UI (relative: it works in run descriptions), in the
    model-training view."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _key(k: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in k)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The metrics of a trial's result worth logging: ours, not Ray's bookkeeping."""
    return {k: float(v) for k, v in result.items() if _finite(v) and ("/" in k or k in TRIAL_SCALARS)}


class StudyTracker:
    """One study's runs in one MLflow experiment, through a single MlflowClient."""

    def __init__(self, tracking_uri: str, experiment: str, study: str) -> None:
        self.uri = tracking_uri
        self.experiment_name = experiment
        self.study = study
        self._client: MlflowClient | None = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.rebuilt = False  # start() found no run of the study where study.json said: a new one

    def __getstate__(self) -> dict[str, Any]:  # the client is rebuilt after unpickling (resume)
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    def start(self, params: dict[str, Any], description: str = "", parent_run_id: str | None = None) -> str:
        """Create the experiment if needed, and the study's parent run (or reopen ``parent_run_id``)."""
        exp = self.client.get_experiment_by_name(self.experiment_name)
        self.experiment_id = (
            exp.experiment_id
            if exp
            else self.client.create_experiment(self.experiment_name, artifact_location=artifact_location(self.uri))
        )
        if parent_run_id is not None and self._holds_parent(parent_run_id):
            self.client.update_run(parent_run_id, status="RUNNING")
            self.parent_run_id = parent_run_id
            return parent_run_id
        self.rebuilt = parent_run_id is not None  # the store lost the study's run (deleted or replaced)
        run = self.client.create_run(
            self.experiment_id,
            run_name=self.study,
            tags={"bdx.study": self.study, "bdx.kind": "study", "mlflow.note.content": description},
        )
        self.parent_run_id = run.info.run_id
        self.client.log_batch(self.parent_run_id, params=_params(params))
        return self.parent_run_id

    def _holds_parent(self, run_id: str) -> bool:
        """Whether this store holds ``run_id`` as this study's parent run, in its experiment."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        return (
            run.info.experiment_id == self.experiment_id
            and run.info.lifecycle_stage == "active"
            and run.data.tags.get("bdx.study") == self.study
        )

    def _children(self, kind: str) -> dict[str, Any]:
        """Nested runs of ``kind`` under the parent, by their bdx id tag."""
        flt = children_filter(self.parent_run_id, kind)
        runs = self.client.search_runs([self.experiment_id or ""], filter_string=flt, max_results=50000)
        return {r.data.tags.get(f"bdx.{kind}_id", ""): r for r in runs}

    def child_run(
        self,
        kind: str,
        key: str,
        name: str,
        params: dict[str, Any],
        tags: dict[str, str] | None = None,
        parent: str | None = None,
    ) -> tuple[str, bool]:
        """(run id, created now) of the run for a trial, victim or refit with id ``key``, nested
        under ``parent`` (default: the study's run)."""
        parent = parent or self.parent_run_id
        flt = children_filter(parent, kind, key)
        found = self.client.search_runs([self.experiment_id or ""], filter_string=flt, max_results=1)
        if found:
            return found[0].info.run_id, False
        run = self.client.create_run(
            self.experiment_id or "",
            run_name=name,
            tags={
                PARENT_TAG: parent or "",
                "bdx.study": self.study,
                "bdx.kind": kind,
                f"bdx.{kind}_id": key,
                **(tags or {}),
            },
        )
        self.client.log_batch(run.info.run_id, params=_params(params))
        return run.info.run_id, True

    def trial_run(
        self, trial_id: str, params: dict[str, Any], fold: str | None = None, searched: list[str] | None = None
    ) -> tuple[str, bool]:
        """The nested run of a trial: params named as in the YAML, the family as param and tag
        (and the nested fold it searched for, if any). The searched params are marked apart from
        the fixed ones: tag ``bdx.searched`` and the run's description."""
        family = str(params["detector"])
        tags = {"bdx.detector": family, **({"bdx.fold": fold} if fold else {})}
        if searched is not None:
            values = ", ".join(f"{k} = {params.get(k)}" for k in searched) or "nothing (a fixed configuration)"
            tags["bdx.searched"] = ", ".join(searched)
            tags["mlflow.note.content"] = (
                f"{family} trial {trial_id}. Searched: {values}. Every other parameter is fixed by the study file."
            )
        return self.child_run("trial", trial_id, f"{family}-{trial_id}", params, tags)

    def refit_run(self, refit_id: str, trial_run_id: str, params: dict[str, Any]) -> tuple[str, bool]:
        """The run of a refit, nested under its trial's run (not the study's)."""
        note = (
            f"Refit {refit_id}: the trial's config fitted again with a fresh seed and a fresh draw of the defender's "
            "clean data (refit spread)."
        )
        tags = {"bdx.detector": str(params.get("detector", "")), "mlflow.note.content": note}
        return self.child_run("refit", refit_id, refit_id, params, tags, parent=trial_run_id)

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._log_batches(run_id, [Metric(_key(k), float(v), now, 0) for k, v in metrics.items() if _finite(v)])

    def _log_batches(self, run_id: str, items: list[Metric]) -> None:
        """``items`` in batches MLflow accepts (at most 1,000 metrics a call)."""
        for i in range(0, len(items), 900):
            self.client.log_batch(run_id, metrics=items[i : i + 900])

    def log_curves(self, run_id: str, path: Path) -> None:
        """Per-step curves of the trial's fitted components (e.g. BaDExpert's unlearning curve:
        B's clean accuracy and attack success vs its finetuning steps) as stepped metrics
        ``<victim>/<component>_curve/<name>``."""
        if not path.is_file():
            return
        now = int(time.time() * 1000)
        items = []
        for victim, components in json.loads(path.read_text()).items():
            for component, curve in components.items():
                for name, values in curve.items():
                    if name == "step":
                        continue
                    for step, v in zip(curve["step"], values, strict=True):
                        if _finite(v):
                            items.append(Metric(_key(f"{victim}/{component}_curve/{name}"), float(v), now, int(step)))
        self._log_batches(run_id, items)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if path.is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def finish(self, run_id: str, ok: bool = True, status: str | None = None) -> None:
        """Close a run: FINISHED, FAILED (``ok=False``) or the given ``status`` (e.g. KILLED)."""
        self.client.set_terminated(
            run_id, status or RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        )

    def log_progress(self, run_id: str, result: dict[str, Any]) -> None:
        """A trial's progress over victims: ``running/objective`` at step = victims done (the
        objective over the victims evaluated so far), and whether the study's pruner stopped it
        (tag ``bdx.status``: complete | pruned; ``bdx.stopped_at``: the last victim it saw)."""
        now = int(time.time() * 1000)
        steps = result.get("progress") or []
        self._log_batches(
            run_id, [Metric("running/objective", float(v), now, i) for i, v in enumerate(steps, start=1) if _finite(v)]
        )
        if "pruned" not in result:
            return
        done, planned = int(result.get("victims_done", 0)), int(result.get("victims_planned", 0))
        tags = {"bdx.status": "pruned" if result["pruned"] else "complete", "bdx.victims": f"{done}/{planned}"}
        if result["pruned"]:
            tags["bdx.stopped_at"] = str(result.get("stopped_at", ""))
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)

    def log_trial(self, run_id: str, result: dict[str, Any], name: str | None = None) -> None:
        """Metrics and artifacts of a finished (or pruned) trial (renamed ``name``, if given), then
        mark its run FINISHED: a pruned trial is a result (tagged ``bdx.status: pruned``), not a
        failure."""
        if name is not None:
            self.client.update_run(run_id, name=name)
        self.log_metrics(run_id, trial_metrics(result))
        self.log_progress(run_id, result)
        self.log_curves(run_id, Path(result.get("curves_path", "")))
        self.log_artifact(run_id, Path(result.get("scores_path", "")), "scores")
        self.log_artifact(run_id, Path(result.get("plot_path", "")), "plots")
        self.finish(run_id, ok=True)

    def sync(self, spec: StudySpec, study_dir: Path) -> int:
        """Make MLflow agree with Parquet: log every trial that is finished in Parquet but not
        FINISHED in MLflow (after a tracking outage or a driver killed while logging), and delete
        (MLflow's soft delete) the runs of trials that never finished and never will (trials a
        killed driver had started after Tune's last snapshot). Call only while no launch of the
        study runs. Returns how many trials were logged."""
        tables = StudyTables(study_dir)
        finished = tables.finished_trials()
        runs = self._children("trial")
        for trial_id, run in runs.items():
            if run.info.status == "RUNNING" and trial_id not in finished:
                self.client.delete_run(run.info.run_id)
        logged = 0
        for trial_id in sorted(finished):
            run = runs.get(trial_id)
            if run is not None and run.info.status == "FINISHED":
                continue
            report_path = study_dir / "artifacts" / trial_id / "report.json"
            if not report_path.is_file():
                continue
            result = json.loads(report_path.read_text())
            if run is None:
                row = tables.read_part("trials", trial_id).slice(0, 1).to_pylist()[0]
                params = row_params(row)
                run_id, _ = self.trial_run(
                    trial_id, params, searched=sorted(spec.optuna_space(str(params["detector"])))
                )
            else:
                run_id = run.info.run_id
            self.log_trial(run_id, result, trial_run_name(trial_id, result, spec.search.objective.selection_key))
            logged += 1
        self.sync_refits(tables, study_dir)
        return logged

    def sync_refits(self, tables: StudyTables, study_dir: Path) -> int:
        """Log every stored refit not yet FINISHED in MLflow, nested under its trial's run."""
        trial_runs = self._children("trial")
        logged = 0
        for refit_id in sorted(tables.finished_trials(kind="refits")):
            trial_id = refit_id.rsplit("-refit", 1)[0]
            report_path = study_dir / "artifacts" / f"refits-{refit_id}" / "report.json"
            if trial_id not in trial_runs or not report_path.is_file():
                continue
            row = tables.read_part("refits", refit_id).slice(0, 1).to_pylist()[0]
            run_id, created = self.refit_run(refit_id, trial_runs[trial_id].info.run_id, row_params(row))
            if not created and self.client.get_run(run_id).info.status == "FINISHED":
                continue
            self.log_trial(run_id, json.loads(report_path.read_text()))
            logged += 1
        return logged

    def name_the_best(self, trial_id: str) -> None:
        """Name the study's best trial on its run: tags, a link first in its description, and the
        run's name (``<study> | best: <trial run name>``, the page's title)."""
        run = self._children("trial").get(trial_id)
        if run is None or self.parent_run_id is None:
            return
        link = run_link(self.experiment_id or "", run.info.run_id)
        self.client.set_tag(self.parent_run_id, "bdx.best_trial", trial_id)
        self.client.set_tag(self.parent_run_id, "bdx.best_trial_run", run.info.run_id)
        note = self.client.get_run(self.parent_run_id).data.tags.get("mlflow.note.content", "")
        note = note.split(BEST_END, 1)[-1] if note.startswith("Best trial:") else note.split("\n\nBest trial:")[0]
        best = f"Best trial: [{run.info.run_name}]({link})"  # first in the description
        self.client.set_tag(self.parent_run_id, "mlflow.note.content", f"{best}{BEST_END}{note}".rstrip())
        # MLflow shows a run's description below its tags: the page's title says it at once
        self.client.update_run(self.parent_run_id, name=f"{self.study} | best: {run.info.run_name}")


def trial_params(spec: StudySpec, sampled: dict[str, Any]) -> dict[str, Any]:
    """Every setting of a trial (the family, its parameters and the protocol's: sampled, fixed
    and defaults), named as in the YAML."""
    family, params, protocol = spec.trial_config(sampled)
    return {"detector": family, **protocol.to_row(), **params.to_params()}


def searched_names(spec: StudySpec, sampled: dict[str, Any]) -> list[str]:
    """The parameters the study searches for the trial's family (the rest are fixed)."""
    family, _, _ = spec.trial_config(sampled)
    return sorted(spec.optuna_space(family))


def row_params(row: dict[str, Any]) -> dict[str, Any]:
    """:func:`trial_params` of a trials-table row."""
    from bdx_study.detectors import DETECTORS

    params = DETECTORS.get(row["detector"]).Params.model_validate_json(row["params"])
    return {"detector": row["detector"], **ProtocolConfig.from_row(row).to_row(), **params.to_params()}


def _params(params: dict[str, Any]) -> list[Param]:
    return [Param(_key(k), str(v)[:6000]) for k, v in params.items()]


class MlflowStudyCallback(tune.Callback):
    """Driver-side Tune callback: a nested MLflow run per trial, params named as in the YAML,
    per-victim and aggregate metrics, the per-sample scores and the confidence-plane plot.

    Tune pickles its callbacks with the experiment and restores them on resume, so this object
    keeps no state that cannot be rebuilt: run ids are looked up by tag, progress is counted
    from the study's tables (:meth:`setup`)."""

    def __init__(self, tracker: StudyTracker, spec: StudySpec, study_dir: Path, fold: str | None = None) -> None:
        self.tracker = tracker
        self.spec = spec
        self.study_dir = study_dir
        self.fold = fold  # a nested fold's sub-study: its trials are tagged bdx.fold
        self.total = spec.num_trials
        self.completed: set[str] = set()
        self.failures = 0  # MLflow calls that failed (or were skipped) in the current outage
        self.failed_at = 0.0
        self.stopping = False  # a trial met a full disk: Tune's run is being stopped
        self.live = LiveOptuna(spec, study_dir) if fold is None else None  # optuna.db as the search runs

    def setup(self, *args: Any, **info: Any) -> None:
        """Called when a run starts or resumes: take the current MLflow ids from study.json (a
        resumed study may have a tracking server that was down at its first launch)."""
        self.completed = set()
        self.failures = 0
        self.failed_at = 0.0
        self.stopping = False
        self.live = getattr(self, "live", None)  # None: a nested fold's search (or a study launched before it)
        if self.live is not None:
            self.live.rebuild()  # what the tables hold now; the search adds to it
        ids_path = self.study_dir / "study.json"
        if ids_path.is_file():
            ids = json.loads(ids_path.read_text())
            self.tracker.uri = ids.get("tracking_uri") or self.tracker.uri
            self.tracker.experiment_id = ids.get("experiment_id")
            self.tracker.parent_run_id = ids.get("parent_run_id")
            self.tracker._client = None

    def _safe(self, what: str, fn: Any, *args: Any) -> Any:
        """Tracking must never kill or stall the study (Parquet keeps the results): during an
        outage MLflow is tried again only every OUTAGE_PAUSE_S seconds, and the outage is
        reported once when it starts and once when it ends, not at every call."""
        if self.failures and time.monotonic() - self.failed_at < OUTAGE_PAUSE_S:
            self.failures += 1
            return None
        try:
            if self.tracker.parent_run_id is None:
                raise RuntimeError("MLflow was unreachable when the study started")
            out = fn(*args)
        except Exception as e:
            self.failed_at = time.monotonic()
            if self.failures == 0:
                print(
                    f"[bdx-study] WARNING: MLflow {what} failed ({short_error(e)}); the study goes on, results stay "
                    "in Parquet and are logged when MLflow answers again (or by `bdx-study sync`)",
                    flush=True,
                )
            self.failures += 1
            return None
        if self.failures:
            print(f"[bdx-study] MLflow answers again after {self.failures} failed call(s)", flush=True)
            self.failures = 0
        return out

    def _run_id(self, trial: Any) -> str | None:
        got = self._safe(
            "run creation",
            self.tracker.trial_run,
            trial.trial_id,
            trial_params(self.spec, trial.config),
            self.fold,
            searched_names(self.spec, trial.config),
        )
        return got[0] if got else None

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._run_id(trial)
        if self.live is not None:
            self.live.started(trial.trial_id, trial.config)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        step, value = result.get("victims_done"), result.get("measured")  # the objective as measured so far
        if self.live is not None and result.get("intermediate") and _finite(value) and step is not None:
            self.live.progress(trial.trial_id, int(step), float(value or 0.0))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.completed.add(trial.trial_id)
        # Progress counts the trials Tune knows. A trial a killed driver started after Tune's last
        # snapshot can still finish on its orphaned worker: its result stays in the tables (nothing
        # finished is lost), but Tune never saw it, so it is not one of this search's trials.
        known = {t.trial_id for t in trials}
        done = len(self.completed | (StudyTables(self.study_dir).finished_trials() & known))
        result = trial.last_result or {}
        run_id = self._run_id(trial)
        if run_id is not None:
            name = trial_run_name(trial.trial_id, result, self.spec.search.objective.selection_key)
            self._safe("logging", self.tracker.log_trial, run_id, result, name)
        if self.live is not None:
            self.live.finished(trial.trial_id, str(trial.config["detector"]))
        obj = result.get("objective", float("nan"))
        how = "finished"
        if result.get("pruned"):
            how = (
                f"pruned after {int(result.get('victims_done', 0))}/{int(result.get('victims_planned', 0))} victims "
                f"({result.get('stopped_at', '')})"
            )
        measured = result.get(self.spec.search.objective.selection_key, obj)  # as measured, not the penalty
        said = f"objective {obj:.4f}"
        if not result.get("feasible", 1.0):
            said = f"objective {measured:.4f} (infeasible: the search ranks it at {obj:.4f})"
        print(
            f"[bdx-study] trial {done}/{self.total} {trial.trial_id} {how}: {said}; "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in trial.config.items()),
            flush=True,
        )

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        err = _pickled_error(trial)
        if self._stop_on_full_disk(err):
            return
        print(
            f"[bdx-study] trial {trial.trial_id} failed ({_said(err)}) and is retried "
            f"({trial.num_failures} failure(s) so far, at most {self.spec.resources.max_failures})",
            flush=True,
        )

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        run_id = self._run_id(trial)
        if run_id is not None:
            self._safe("logging", self.tracker.finish, run_id, False)
        if self.live is not None:
            self.live.failed(trial.trial_id)
        err = _pickled_error(trial)
        if not self._stop_on_full_disk(err):
            print(f"[bdx-study] trial {trial.trial_id} failed ({_said(err)}; Ray's report above)", flush=True)

    def _stop_on_full_disk(self, err: BaseException | None) -> bool:
        """A trial that failed (with ``err``) for want of disk space: every other trial would too,
        and a retry cannot succeed. Stop Tune's run as Ctrl-C does (its state is saved; the trial
        is run again by ``launch --resume``); the launch reports the full disk, once. Whether it
        was one."""
        if not is_disk_full(err):
            return False
        if not self.stopping:
            self.stopping = True
            handler = signal.getsignal(signal.SIGUSR1)  # Tune's "stop the run" (main thread only)
            if threading.current_thread() is threading.main_thread() and callable(handler):
                signal.raise_signal(signal.SIGUSR1)
        return True


def _pickled_error(trial: Any) -> BaseException | None:
    """The error a trial last failed with, as Tune keeps it (None if it kept none): Tune writes it
    beside the driver first and copies it to the study's storage later."""
    import cloudpickle

    try:
        local = Path(trial.pickled_error_file or "")
        err = cloudpickle.loads(local.read_bytes()) if local.is_file() else trial.get_pickled_error()
    except Exception:
        return None
    return err if isinstance(err, BaseException) else None


def _said(err: BaseException | None) -> str:
    """What a failed trial last raised, on one line (a lost node reads as Ray's actor error)."""
    if err is None:
        return "see Ray's error above"
    return short_error(getattr(err, "cause", None) or err)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
