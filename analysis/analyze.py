"""``bdx-study analyze``: every analysis of a finished (or interrupted) study, written to the
study folder and attached to its MLflow run.

1. robust defaults per family (with refit uncertainty, bootstrap intervals and held-out folds),
   written as ``recipe.yaml``;
2. the family x victim comparison (``analysis/comparison.csv`` and ``.parquet``, ROC plot);
3. the searches: each family's objective against each searched setting, fANOVA importance, the
   Pareto front of a multi-objective search, and the sweep rebuilt as Optuna studies
   (``optuna.db``);
4. the paper's two figures (BaDExpert): B's unlearning curve, and AUROC against |D_c| when the
   study varies it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa

from bdx_study._io import write_text_atomic
from bdx_study.space import StudySpec
from bdx_study.tables import StudyTables, write_table_atomic

from .figures import auroc_vs_clean_set, plot_auroc_vs_clean_set, plot_unlearning_curve
from .recipe import Recipe
from .report import plot_comparison, plot_params, pruning_text, render
from .robust import RobustDefaults, comparison, load_trials, robust_defaults
from .searches import param_importances, pareto, plot_importances, plot_pareto, write_optuna_study


@dataclass
class Analysis:
    text: str  # what `analyze` prints
    recipe: Path
    files: list[Path] = field(default_factory=list)  # everything written under the study folder
    logged: bool = False  # attached to the study's MLflow run


def _write(table: pd.DataFrame, folder: Path, stem: str) -> list[Path]:
    write_text_atomic(folder / f"{stem}.csv", table.to_csv(index=False))
    write_table_atomic(pa.Table.from_pandas(table, preserve_index=False), folder / f"{stem}.parquet")
    return [folder / f"{stem}.csv", folder / f"{stem}.parquet"]


def analyze(spec: StudySpec) -> Analysis:
    study_dir = spec.study_dir
    folder = study_dir / "analysis"
    made_from = StudyTables(study_dir).counts()  # counted first: a launch may add more while we read
    trials = load_trials(study_dir)
    per_family = robust_defaults(study_dir, spec, trials)
    out = Recipe.of(per_family, spec, study_dir, made_from).write(study_dir / "recipe.yaml")
    table = comparison(per_family)
    files = [out, *_write(table, folder, "comparison")]
    files.append(plot_comparison(per_family, _policy_scores(study_dir, per_family), folder / "comparison_roc.png"))
    text = [render(per_family, spec, table), *filter(None, [pruning_text(trials, spec)])]
    plot = plot_params(trials, spec, spec.search.objective.metric, folder / "objective_vs_params.png")
    files += _importance(trials, spec, folder, text)
    files += _pareto(trials, spec, folder, text)
    files += [plot] if plot else []
    if "badexpert" in per_family:  # the paper's two figures
        files += _paper_figures(per_family["badexpert"], trials, spec, folder, text)
    optuna_db = write_optuna_study(trials, spec, study_dir / "optuna.db")
    logged = _log(study_dir, files)
    text.append(
        f"\nrecipe: {out}\ncomparison: {folder / 'comparison.csv'} (and .parquet), plots in {folder}"
        + (f"\noptuna studies: sqlite:///{optuna_db}" if optuna_db.exists() else "")
        + ("\nlogged to the study's MLflow run under analysis/" if logged else "")
    )
    return Analysis("\n".join(text), out, files, logged)


def _policy_scores(study_dir: Path, per_family: dict[str, RobustDefaults]) -> pd.DataFrame:
    """The per-input scores of each family's fit chosen by its seed policy."""
    tables = StudyTables(study_dir)
    return pd.concat(
        [
            tables.read_part(
                "scores" if rd.seed_policy["fit_kind"] == "trials" else "refit_scores", rd.seed_policy["fit"]
            ).to_pandas()
            for rd in per_family.values()
        ],
        ignore_index=True,
    )


def _importance(trials: pd.DataFrame, spec: StudySpec, folder: Path, text: list[str]) -> list[Path]:
    """fANOVA importance of the searched settings: its table, plot and lines of text."""
    importance = param_importances(trials, spec)
    if importance.empty:
        return []
    files = _write(importance, folder, "importance")
    text.append(
        "\nHyperparameter importance (fANOVA on the searched settings; selection-split objective; +- sd over "
        "bootstrap resamples of the trials):"
    )
    for family, t in importance.groupby("detector", sort=False):
        top = ", ".join(
            f"{r.param} {r.importance:.2f} +- {r.importance_sd:.2f}"
            for r in t.sort_values("importance").iloc[::-1].itertuples()
        )
        text.append(f"  {family} ({int(t['trials'].iloc[0])} trials): {top}")
    imp_plot = plot_importances(importance, folder / "importance.png")
    return files + ([imp_plot] if imp_plot else [])


def _pareto(trials: pd.DataFrame, spec: StudySpec, folder: Path, text: list[str]) -> list[Path]:
    """The Pareto front of a multi-objective search: its table, plot and lines of text."""
    front = pareto(trials, spec)
    if front.empty:
        return []
    files = _write(front, folder, "pareto")
    text.append("\nPareto front of the multi-objective search (selection split; cost as measured):")
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        text.append(front[front["pareto_front"]].drop(columns=["pareto_front"]).to_string(index=False))
    p = plot_pareto(front, spec, folder / "pareto.png")
    return files + ([p] if p else [])


def _paper_figures(
    rd: RobustDefaults, trials: pd.DataFrame, spec: StudySpec, folder: Path, text: list[str]
) -> list[Path]:
    """BaDExpert's unlearning curve, and AUROC against |D_c| when the study varies it."""
    curve = plot_unlearning_curve(rd, folder / "unlearning_curve.png")
    files = [curve] if curve else []
    by_size = auroc_vs_clean_set(trials, spec)
    if len(by_size) >= 2:
        files += _write(by_size, folder, "auroc_vs_clean_set_size")
        p = plot_auroc_vs_clean_set(by_size, spec.search.objective.metric, folder / "auroc_vs_clean_set_size.png")
        files += [p] if p else []
        text.append("\nBaDExpert, best config per |D_c| (evaluation split):")
        text.append(by_size.to_string(index=False, float_format="{:.4f}".format))
    return files


def _log(study_dir: Path, files: list[Path]) -> bool:
    """Attach the analysis files to the study's parent MLflow run (best effort)."""
    try:
        ids = json.loads((study_dir / "study.json").read_text())
        if not (ids.get("tracking_uri") and ids.get("parent_run_id")):
            return False
        from mlflow.tracking import MlflowClient

        client = MlflowClient(ids["tracking_uri"])
        for f in files:
            client.log_artifact(ids["parent_run_id"], str(f), "analysis")
        return True
    except Exception as e:
        print(f"bdx-study: warning: analysis not logged to MLflow ({type(e).__name__}: {e})", file=sys.stderr)
        return False
