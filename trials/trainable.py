"""The Ray Tune trainable: one trial = one detector family with one config, evaluated against
every victim of the study under the shared protocol. Fitted components and their outputs come
from the stage cache, so trials that differ only in scoring knobs cost tensor arithmetic."""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import pyarrow as pa
import ray
import torch
from ray import tune

from bdx_study._io import disk_full_reported, write_json_atomic
from bdx_study.attacks import Attack
from bdx_study.data import Splits
from bdx_study.detectors import DetectorFamily, create_detector
from bdx_study.metrics import HEADLINE
from bdx_study.objective import aggregate
from bdx_study.plugins import load_plugins
from bdx_study.protocol import Part, ProtocolConfig, scoring_parts
from bdx_study.pruning import TrialPruner, stored_rows
from bdx_study.schema import scores_table, victim_columns
from bdx_study.stages import DetectorRun, LoadedVictim, StageStore, run_detector
from bdx_study.tables import SCORES_OF, StudyTables
from bdx_study.training import pick_device
from bdx_study.victims import VictimCache, VictimConfig, VictimRecord

from .context import StudyContext, objective_value, objective_values
from .plots import plot_trial

T = TypeVar("T")


class WorkerCache:
    """What a worker process keeps between trials (Ray reuses trial actors, so a study loads each
    victim once per worker): victims' models and attacks, data splits, scored inputs and stage
    stores.

    One dict, keyed ``(kind, *identity)``: the kind of value, then the identity of what it is
    built from (a victim cache's folder and a victim's key, a data config, a protocol's clean
    set), as strings."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, ...], Any] = {}

    def _get(self, key: tuple[str, ...], build: Callable[[], T]) -> T:
        if key not in self._entries:
            self._entries[key] = build()
        return cast("T", self._entries[key])

    def clear(self, kind: str | None = None) -> None:
        """Forget every entry (of ``kind``: model, attack, splits, parts, stage_store)."""
        for key in [k for k in self._entries if kind is None or k[0] == kind]:
            del self._entries[key]

    def splits(self, config: VictimConfig) -> Splits:
        return self._get(
            ("splits", config.dataset, config.data.model_dump_json()), lambda: config.data.splits(config.dataset)
        )

    def _record(self, cache_root: Path, config: VictimConfig) -> VictimRecord:
        record = VictimCache(cache_root).load(config)
        if record is None:
            raise RuntimeError(f"victim {config.name} is missing or corrupt in {cache_root}; relaunch to retrain it")
        return record

    def attack(self, cache_root: Path, config: VictimConfig) -> Attack:
        """The victim's attack as trained (generators, optimized triggers, encoders loaded)."""
        key = ("attack", str(cache_root), config.key)
        return self._get(key, lambda: self._record(cache_root, config).load_attack())

    def victim(self, cache_root: Path, config: VictimConfig, device: torch.device) -> LoadedVictim:
        """The victim as trained: its model on ``device``, its attack and its splits."""
        key = ("model", str(cache_root), config.key, str(device))
        model = self._get(key, lambda: self._record(cache_root, config).load_model(device))
        return LoadedVictim(
            config.key, model, self.splits(config), self.attack(cache_root, config), config.data.layout()
        )

    def parts(self, cache_root: Path, config: VictimConfig, protocol: ProtocolConfig) -> list[Part]:
        """The inputs a trial scores on the victim under ``protocol`` (they depend on its clean set)."""
        key = ("parts", config.key, config.data.model_dump_json(), json.dumps(protocol.clean_set_identity()))
        return self._get(key, lambda: scoring_parts(self.splits(config), self.attack(cache_root, config), protocol))

    def stage_store(self, root: Path | None) -> StageStore:
        return self._get(("stage_store", str(root) if root is not None else ""), lambda: StageStore(root))


CACHE = WorkerCache()  # one per worker process


@dataclass
class TrialResult:
    family: DetectorFamily
    protocol: ProtocolConfig
    runs: list[tuple[VictimConfig, DetectorRun]]  # the victims evaluated, in the study's order
    steps: dict[str, int] = field(default_factory=dict)  # victim key -> its position in the trial (1 = first)
    planned: int = 0  # victims the trial set out to evaluate
    pruned: bool = False  # stopped early by the study's pruner
    pruner_attrs: dict[str, Any] = field(default_factory=dict)
    progress: list[float] = field(default_factory=list)  # the running objective after each step

    @property
    def stopped_at(self) -> str:
        """The victim the trial evaluated last."""
        last = max(self.steps, key=lambda k: self.steps[k], default="")
        return next((v.name for v, _ in self.runs if v.key == last), "")


# Called after each victim with (step, the result so far); True stops the trial (pruned).
AfterVictim = Callable[[int, TrialResult], bool]


def run_trial(
    ctx: StudyContext,
    config: dict[str, Any],
    *,
    device: torch.device,
    pruner: TrialPruner | None = None,
    after_victim: AfterVictim | None = None,
) -> TrialResult:
    """The computation of a trial: the family with ``config`` on every victim of the study (in
    ``pruner``'s order, until ``after_victim`` stops it)."""
    name, params, protocol = ctx.spec.trial_config(config)
    order = pruner.order(ctx.victims) if pruner is not None else None
    return run_family(
        ctx, create_detector(name, params), protocol, device=device, order=order, after_victim=after_victim
    )


def run_family(
    ctx: StudyContext,
    family: DetectorFamily,
    protocol: ProtocolConfig,
    *,
    device: torch.device,
    order: list[int] | None = None,
    after_victim: AfterVictim | None = None,
) -> TrialResult:
    """A family with fixed parameters, under ``protocol``, on the study's victims in ``order``
    (indices; default: the study's order) until ``after_victim`` says stop. The result lists the
    evaluated victims in the study's order whatever the order they ran in, so its aggregates and
    rows do not depend on it."""
    store = CACHE.stage_store(ctx.stage_cache)
    order = list(range(len(ctx.victims))) if order is None else order
    done: dict[int, DetectorRun] = {}
    res = TrialResult(family, protocol, [], planned=len(order))
    for step, i in enumerate(order, start=1):
        victim = ctx.victims[i]
        loaded = CACHE.victim(ctx.victim_cache, victim, device)
        parts = CACHE.parts(ctx.victim_cache, victim, protocol)
        done[i] = run_detector(store, family, protocol, loaded, device=device, parts=parts)
        res.steps[victim.key] = step
        res.runs = [(ctx.victims[j], done[j]) for j in sorted(done)]
        if after_victim is not None and after_victim(step, res):
            res.pruned = step < len(order)
            break
    return res


def _node_id() -> str:
    """The Ray node this process runs on (several nodes may share a host), else the host name."""
    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return socket.gethostname()


def _rows(ctx: StudyContext, trial_id: str, res: TrialResult, device: torch.device) -> list[dict[str, Any]]:
    node = _node_id()
    common = {
        "study": ctx.name,
        "trial_id": trial_id,
        "detector": res.family.name,
        **res.protocol.to_row(),
        **res.family.params.to_row(),
        "params": res.family.params.to_json(),
        "node": node,
        "device": str(device),
        "gpu_ids": ",".join(map(str, ray.get_gpu_ids())) if ray.is_initialized() else "",
    }
    rows = []
    common.update(
        pruned=res.pruned,
        victims_planned=res.planned,
        pruner_attrs=json.dumps(res.pruner_attrs, sort_keys=True) if res.pruner_attrs else None,
    )
    for victim, run in res.runs:
        step = res.steps.get(victim.key)
        running = res.progress[step - 1] if step is not None and step <= len(res.progress) else None
        ev = run.evaluation
        p = res.protocol
        finetune = p.clean_set_size if p.calibration_size is not None else p.clean_set_size - p.calibration_images
        rows.append(
            {
                **common,
                **victim_columns(victim),
                **ev.metrics,
                **{f"selection_{k}": v for k, v in ev.selection_metrics.items()},
                **run.costs,
                "finetune_images": finetune,
                "calibration_images": p.calibration_images,
                "stages_fitted": run.fitted_now,
                "stage_keys": json.dumps(run.stage_keys, sort_keys=True),
                "fit_meta": json.dumps({c: r.fitted.meta for c, r in run.components.items()}, sort_keys=True),
                "victim_step": step,
                "running_objective": running if running is not None and math.isfinite(running) else None,
            }
        )
    return rows


def trial_aggregates(res: TrialResult) -> dict[str, float]:
    """``worst/`` and ``mean/`` of every metric across victims (evaluation split), and of the
    selection split's (``worst/selection_...``)."""
    out = aggregate([{**run.evaluation.metrics, **run.costs} for _, run in res.runs])
    for key, value in aggregate([run.evaluation.selection_metrics for _, run in res.runs]).items():
        how, _, metric = key.partition("/")
        out[f"{how}/selection_{metric}"] = value
    return out


def execute_trial(
    ctx: StudyContext, trial_id: str, config: dict[str, Any], progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run trial ``trial_id`` with ``config`` (the family under ``detector`` and the sampled
    values; the study's fixed ones come from ``ctx``), victim by victim under the study's pruning
    (``search.pruning``; the study state is the family's trials stored when it starts), passing
    ``progress`` a report after each victim but the last; write its plot, report and Parquet
    parts (the trial counts as finished once its trials part exists). Returns the report."""
    start, started_at = time.perf_counter(), time.time()
    device = _device(ctx)
    family = str(config["detector"])
    metric = ctx.spec.search.objective.metric
    stored = stored_rows(ctx.study_dir, family, metric) if ctx.spec.pruning.kind != "none" else None
    pruner = TrialPruner(ctx.spec, family, stored, trial_id)

    def after_victim(step: int, res: TrialResult) -> bool:
        aggregates = trial_aggregates(res)
        running, feasible = objective_value(ctx.spec, aggregates) if res.runs else (math.nan, False)
        res.progress.append(_running(ctx, aggregates, running))
        stop = pruner.stop(step, res.planned, aggregates, res.progress[-1])
        res.pruner_attrs = pruner.attrs
        if progress is not None and step < res.planned and not stop:
            # unpenalized: what optuna.db shows (the search ranks by ``running``)
            measured = aggregates.get(ctx.spec.search.objective.selection_key, math.nan)
            progress(
                {
                    "objective": running,
                    "measured": measured,
                    "feasible": float(feasible),
                    "victims_done": float(step),
                    "intermediate": 1.0,
                }
            )
        return stop

    res = run_trial(ctx, config, device=device, pruner=pruner, after_victim=after_victim)
    return _record(ctx, trial_id, res, device, start, started_at)


def _running(ctx: StudyContext, aggregates: dict[str, float], value: float) -> float:
    """The running objective as pruners see it: NaN while the objective is undefined (no victim
    with a backdoor yet), not the worst finite value the search records for a whole trial."""
    return value if math.isfinite(aggregates.get(ctx.spec.search.objective.selection_key, math.nan)) else math.nan


def execute_refit(ctx: StudyContext, trial_row: dict[str, Any], index: int) -> str:
    """Fit trial ``trial_row``'s config again with a fresh seed (seed + index) and a fresh draw
    of D_c (clean_set_seed + index), on every victim; store it as refit ``<trial>-refit<index>``."""
    start, started_at = time.perf_counter(), time.time()
    device = _device(ctx)
    refit_id = f"{trial_row['trial_id']}-refit{index}"
    params = json.loads(trial_row["params"])
    params["seed"] = int(params["seed"]) + index
    protocol = ProtocolConfig.from_row(trial_row)
    protocol = protocol.model_copy(update={"clean_set_seed": protocol.clean_set_seed + index})
    res = run_family(ctx, create_detector(trial_row["detector"], params), protocol, device=device)
    _record(ctx, refit_id, res, device, start, started_at, refit=(str(trial_row["trial_id"]), index))
    return refit_id


def execute_heldout(ctx: StudyContext, trial_row: dict[str, Any]) -> str:
    """Measure trial ``trial_row``'s config, unchanged, on ``ctx``'s victims (a nested fold's
    held-out victims); stored under the trial's id in the ``heldout`` tables of ``ctx``'s study."""
    start, started_at = time.perf_counter(), time.time()
    device = _device(ctx)
    params = json.loads(trial_row["params"])
    protocol = ProtocolConfig.from_row(trial_row)
    res = run_family(ctx, create_detector(trial_row["detector"], params), protocol, device=device)
    trial_id = str(trial_row["trial_id"])
    _record(ctx, trial_id, res, device, start, started_at, kind="heldout")
    return trial_id


def _device(ctx: StudyContext) -> torch.device:
    """Set a worker up for a trial (the study's plugins imported, its threads) and pick its device."""
    load_plugins(ctx.spec.study.plugins)
    torch.set_num_threads(max(1, math.floor(ctx.spec.resources.cpu)))
    return pick_device(prefer_gpu=ctx.spec.resources.gpu > 0)


def _record(
    ctx: StudyContext,
    trial_id: str,
    res: TrialResult,
    device: torch.device,
    start: float,
    started_at: float,
    refit: tuple[str, int] | None = None,
    kind: str = "trials",
) -> dict[str, Any]:
    """Write a finished computation: plot, report and Parquet parts (rows last). Returns the report."""
    kind = "refits" if refit is not None else kind
    artifacts = ctx.study_dir / "artifacts" / (trial_id if kind == "trials" else f"{kind}-{trial_id}")
    tables = StudyTables(ctx.study_dir)
    rows = _rows(ctx, trial_id, res, device)
    aggregates = trial_aggregates(res)
    objective, feasible = objective_value(ctx.spec, aggregates)
    plot_path = plot_trial(res.family, [(v.name, run.evaluation) for v, run in res.runs], artifacts / "trial.png")
    elapsed = time.perf_counter() - start
    for r in rows:
        r.update(objective=objective, feasible=feasible, trial_seconds=elapsed, started_at=started_at)
        r["finished_at"] = time.time()
        if refit is not None:
            r.update(refit_of=refit[0], refit_index=refit[1])
    report: dict[str, Any] = {
        "objective": objective,
        "feasible": float(feasible),
        "trial_seconds": elapsed,
        "stages_fitted": float(sum(run.fitted_now for _, run in res.runs)),
        **_progress(res, kind),
    }
    report.update(aggregates)
    for i, value in enumerate(objective_values(ctx.spec, aggregates)):
        report[f"objectives/{i}"] = value
    for victim, run in res.runs:
        for k in HEADLINE:
            val = run.evaluation.metrics.get(k, math.nan)
            if math.isfinite(val):
                report[f"{victim.name}/{k}"] = val
    curves = {
        v.name: {c: r.fitted.meta["curve"] for c, r in run.components.items() if "curve" in r.fitted.meta}
        for v, run in res.runs
    }
    if any(curves.values()):
        write_json_atomic(artifacts / "curves.json", curves)
        report["curves_path"] = str(artifacts / "curves.json")
    report["detector"] = res.family.name
    report["scores_path"] = str(tables.part(SCORES_OF[kind], trial_id))
    report["plot_path"] = str(plot_path)
    report["node"] = rows[0]["node"]
    if not all(math.isfinite(v) for v in report.values() if isinstance(v, float)):
        raise ValueError(f"trial {trial_id}: a non-finite metric would be reported")
    write_json_atomic(artifacts / "report.json", report)
    scores = pa.concat_tables(
        [scores_table(trial_id, v.key, res.family.name, run.evaluation.samples) for v, run in res.runs]
    )
    tables.write_trial(trial_id, rows, scores, kind=kind)  # finished once the rows are there
    return report


def _progress(res: TrialResult, kind: str) -> dict[str, Any]:
    """A report's progress over victims: whether the pruner stopped it, victims done and planned,
    the running objective after each (a search's trials) and the victim it stopped at."""
    out: dict[str, Any] = {
        "pruned": float(res.pruned),
        "victims_done": float(len(res.runs)),
        "victims_planned": float(res.planned),
    }
    if kind == "trials":
        out["progress"] = [v if math.isfinite(v) else None for v in res.progress]
        if res.pruned:
            out["stopped_at"] = res.stopped_at
    return out


def stored_report(ctx: StudyContext, trial_id: str) -> dict[str, Any] | None:
    """The report of a trial that already finished (readable parts and report), else None."""
    report = ctx.study_dir / "artifacts" / trial_id / "report.json"
    if not report.is_file() or trial_id not in StudyTables(ctx.study_dir).finished_trials():
        return None
    try:
        return dict(json.loads(report.read_text()))
    except ValueError:
        return None


def defense_trial(config: dict[str, Any], *, ctx: StudyContext) -> None:
    """Ray Tune function trainable: a report after each victim (the running objective; Tune's
    searcher gives it to Optuna as an intermediate value), then the trial's own (``pruned`` when
    the study's pruner stopped it)."""
    trial_id = tune.get_context().get_trial_id()
    with disk_full_reported(f"running trial {trial_id}", ctx.places()):  # the driver stops the study on it
        # A restored study may restart a trial that had already finished (its result was written
        # after Tune's last experiment snapshot): report the stored result instead of re-running.
        report = stored_report(ctx, trial_id) or execute_trial(ctx, trial_id, config, progress=tune.report)
        tune.report(report)


def bare_trial_seconds(ctx: StudyContext, config: dict[str, Any], device: torch.device | None = None) -> float:
    """Wall time of the same trial computation outside Ray, without the stage cache (for the
    overhead benchmark)."""
    bare = StudyContext(spec=ctx.spec, study_dir=ctx.study_dir, victim_cache=ctx.victim_cache, victims=ctx.victims)
    t = time.perf_counter()
    run_trial(bare, config, device=device or torch.device("cpu"))
    return time.perf_counter() - t


__all__ = [
    "bare_trial_seconds",
    "defense_trial",
    "execute_heldout",
    "execute_refit",
    "execute_trial",
    "run_family",
    "run_trial",
    "stored_report",
    "trial_aggregates",
]
