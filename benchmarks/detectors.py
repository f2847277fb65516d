"""Every detector family on the Fashion-MNIST victims of every attack, under one protocol.

    bdx-study launch --space search_spaces/zoo.yaml     # the victims and BaDExpert's search (about an hour)
    python benchmarks/detectors.py [--space search_spaces/zoo.yaml] [--out docs/detectors.md] [--workers 2]

Reads the zoo study (its victims, its protocol, its BaDExpert trials) and scores, on each victim's
evaluation split:

- every registered family at its published defaults (``bdx-study list``), BaDExpert included at
  the paper's CIFAR-10 ResNet-18 values ("badexpert (paper)");
- BaDExpert at the study's robust defaults picked **leave-one-attack-out**: for the column of
  attack A, the selection rule applied to the study's trials on the *other* attacks' victims,
  then that config fitted and scored on A's victim like every other row ("badexpert (robust,
  LOAO)"); under TPE the candidates were proposed by a search that saw every victim;
- from the committee study (``--committee-space``, ``search_spaces/zoo-committee.yaml``, run
  with ``search.nested_folds: [attack]``), **strictly held out**: for the column of attack A, the
  pick of the fold whose whole search ran without A's victim, for the committee of BaDExpert and
  TED ("committee (nested LOAO)") and for BaDExpert alone under the same search
  ("badexpert (nested LOAO)").

Cost: passes and scoring time as the study counts them, and the throughput of the detector as
served (``Detector.detect`` on the evaluation inputs, M's forward run once for the prediction and
for TED) relative to one bare forward pass of the model.

Every row scores the same inputs: the first ``--eval-inputs`` clean and triggered inputs of each
victim's evaluation split (300 each by default, to keep per-input optimizers such as Cognitive
Distillation to minutes on 2 cores).

Writes a Markdown report: AUROC (correct-only), TPR at 1% FPR, the FPR measured at the calibrated
threshold, and cost per input (victim forward and backward passes, scoring seconds, throughput
relative to one bare forward pass of the model), with the command and the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
from _report import write_keeping_tail

PAPER = "badexpert (paper)"
ROBUST = "badexpert (robust, LOAO)"
COMMITTEE = "committee (nested LOAO)"
EARLIER = " (earlier run)"
SERVED_INPUTS = 300  # evaluation inputs the served throughput is timed on
SERVED_MAX_SECONDS = 0.02  # families slower than this per input (CD, SentiNet, STRIP, TeCo) are not timed served
NESTED = "badexpert (nested LOAO)"
WAIT_FOR_VICTIMS = float(os.environ.get("BDX_WAIT_FOR_VICTIMS", "0"))  # seconds to wait for a launch still training


Entry = tuple[str, str, dict[str, Any]]  # (row label, family, parameters: {} = its defaults)


def _cached_victim(space: str, key: str) -> tuple[Any, Any, Any]:
    """(the study, the victim of ``key``, its cached record), waiting up to WAIT_FOR_VICTIMS for a
    launch still training it."""
    from bdx_study.space import load_space
    from bdx_study.victims import VictimCache

    spec = load_space(space)
    victim = next(v for v in spec.victim_configs() if v.key == key)
    cache = VictimCache(spec.storage_root() / "victims")
    record = cache.load(victim)
    deadline = time.monotonic() + WAIT_FOR_VICTIMS
    while record is None and time.monotonic() < deadline:  # a launch still training it
        time.sleep(15)
        record = cache.load(victim)
    if record is None:
        raise SystemExit(f"victim {victim.name} is not in the cache: run `bdx-study launch --space {space}` first")
    return spec, victim, record


def _cut_parts(parts: list[Any], cut: dict[str, int]) -> list[Any]:
    """Each part of a cut split limited to its first ``cut[split]`` inputs."""
    return [
        dataclasses.replace(
            p,
            x=p.x[: cut[p.split]],
            label=p.label[: cut[p.split]],
            attack_label=p.attack_label[: cut[p.split]],
            sample_index=p.sample_index[: cut[p.split]],
        )
        if p.split in cut
        else p
        for p in parts
    ]


def _served_seconds(family: Any, run: Any, model: Any, info: Any, x: Any) -> float:
    """Seconds per input of the detector as served: its bundle's scoring path on ``x`` (after a
    warm-up call); NaN for families that cost over SERVED_MAX_SECONDS per input as the study counts them."""
    import torch

    from bdx_study.detector import Detector

    if run.costs["score_seconds_per_input"] >= SERVED_MAX_SECONDS:
        return float("nan")
    scorer = family.with_reference(run.reference) if run.reference is not None else family
    manifest = {"threshold": run.evaluation.threshold, "input_shape": list(info.input_shape)}
    det = Detector(manifest, scorer, model, run.fitted, torch.device("cpu"))
    det.detect(x[:8])
    return min(_timed(lambda: det.detect(x)) for _ in range(3)) / max(1, len(x))


def _victim_rows(args: tuple[str, str, list[Entry], str, int, int]) -> list[dict[str, Any]]:
    """Every entry (a family with parameters) on one victim (a worker process)."""
    import torch

    from bdx_study.detectors import create_detector
    from bdx_study.protocol import scoring_parts
    from bdx_study.stages import LoadedVictim, StageStore, run_detector
    from bdx_study.training import predict_proba

    space, key, entries, stages, selection_inputs, eval_inputs = args
    torch.set_num_threads(1)
    spec, victim, record = _cached_victim(space, key)
    cpu = torch.device("cpu")
    model, attack = record.load_model(cpu), record.load_attack()
    splits = victim.data.splits(victim.dataset)
    _, _, protocol = spec.trial_config({"detector": "badexpert"})
    x = splits.evaluation.x
    bare = min(_timed(lambda: predict_proba(model, x, device=cpu)) for _ in range(3)) / max(1, len(x))
    # Only the evaluation split is reported, on its first ``eval_inputs`` clean and triggered
    # inputs (the same for every family); the selection split is cut to its first inputs (it
    # feeds BaDExpert's probe and selection metrics nobody reads here). The benchmark's own
    # stage store, and a layout naming the cuts, keep these outputs apart from the study's.
    cut = {"selection": selection_inputs, "evaluation": eval_inputs}
    parts = _cut_parts(scoring_parts(splits, attack, protocol), cut)
    loaded = LoadedVictim(victim.key, model, splits, attack, {**victim.data.layout(), "benchmark_cut": cut})
    store = StageStore(Path(stages))
    print(f"{victim.attack.name}: scoring {len(entries)} entries", flush=True)
    rows = []
    for label, name, params in entries:
        t = time.perf_counter()
        family = create_detector(name, params)
        run = run_detector(store, family, protocol, loaded, device=cpu, parts=parts)
        rows.append(
            {
                "family": label,
                "attack": victim.attack.name,
                **run.evaluation.metrics,
                **run.costs,
                "bare_forward_seconds_per_input": bare,
                "served_seconds_per_input": _served_seconds(family, run, model, splits.info, x[:SERVED_INPUTS]),
                "wall_seconds": time.perf_counter() - t,
            }
        )
        print(
            f"  {victim.attack.name:16s} {label:26s} AUROC {rows[-1]['auroc_correct_only']:.3f} "
            f"({rows[-1]['wall_seconds']:.0f} s)",
            flush=True,
        )
    return rows


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _robust_loao(spec: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """BaDExpert's robust defaults per attack column, picked by the study's selection rule on the
    other attacks' victims: {attack: (picked trial, its parameters)}."""
    from bdx_study.selection import select
    from bdx_study.tables import StudyTables

    trials = StudyTables(spec.study_dir).read("trials").to_pandas()
    trials = trials[trials["detector"] == "badexpert"]
    obj, max_drop = spec.search.objective, spec.search.constraint.max_clean_acc_drop
    picks = {}
    for attack in sorted(trials["attack"].unique()):
        others = trials[trials["attack"] != attack]
        pick, _ = select(others, obj.metric, obj.aggregate, max_drop)
        row = trials[trials["trial_id"] == pick.trial_id].iloc[0]
        picks[attack] = (str(pick.trial_id), json.loads(row["params"]))
    return picks


def _earlier_rows(csv: Path, families: list[str]) -> pd.DataFrame:
    """Rows of ``families`` from an earlier run's CSV (each of a family's labels: badexpert's
    "(paper)" and "(robust, LOAO)" rows too; never the committee study's rows, scored anew),
    their label marked "(earlier run)"."""
    if not families:
        return pd.DataFrame()
    old = pd.read_csv(csv)
    base = old["family"].str.replace(r" \(.*\)$", "", regex=True)  # "badexpert (paper)" -> badexpert
    missing = sorted(set(families) - set(base))
    if missing:
        raise SystemExit(f"--earlier {' '.join(missing)}: no rows of them in {csv}")
    kept = old[base.isin(families) & ~old["family"].isin([COMMITTEE, NESTED])].copy()
    kept["family"] = kept["family"] + EARLIER
    return kept


def _nested_loao(spec: Any, family: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """``family``'s strictly held-out picks of a study with ``search.nested_folds: [attack]``: for
    each attack, the selection rule on the trials of the fold whose search never saw it:
    {attack: (fold/trial, parameters)}."""
    from bdx_study.folds import fold_spec
    from bdx_study.selection import select
    from bdx_study.tables import StudyTables

    obj, max_drop = spec.search.objective, spec.search.constraint.max_clean_acc_drop
    picks = {}
    for attack in spec.group_values("attack"):
        fs = fold_spec(spec, "attack", attack)
        try:
            trials = StudyTables(fs.study_dir).read("trials").to_pandas()
        except FileNotFoundError:
            continue
        trials = trials[trials["detector"] == family]
        if trials.empty:
            continue
        pick, _ = select(trials, obj.metric, obj.aggregate, max_drop)
        row = trials[trials["trial_id"] == pick.trial_id].iloc[0]
        picks[str(attack)] = (f"{fs.study.name}/{pick.trial_id}", json.loads(row["params"]))
    return picks


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--space", default="search_spaces/zoo.yaml")
    ap.add_argument(
        "--committee-space",
        default="search_spaces/zoo-committee.yaml",
        help="the committee study with nested attack folds (its rows are left out when it has not run)",
    )
    ap.add_argument("--out", type=Path, default=Path("docs/detectors.md"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--families", nargs="*", default=None, help="default: every registered family")
    ap.add_argument(
        "--earlier",
        nargs="*",
        default=[],
        metavar="FAMILY",
        help="families whose rows are kept from the earlier run in --out's CSV instead of scored again (marked so in "
        "the report)",
    )
    ap.add_argument("--stages", default="bdx_runs/bench-detectors/stages", help="the benchmark's stage cache")
    ap.add_argument(
        "--selection-inputs", type=int, default=100, help="selection-split inputs scored per part (not reported)"
    )
    ap.add_argument("--attacks", nargs="*", default=None, help="only the victims of these attacks (default: all)")
    ap.add_argument(
        "--eval-inputs", type=int, default=300, help="evaluation-split inputs scored per part (clean, triggered)"
    )
    return ap.parse_args()


Picks = dict[str, tuple[str, dict[str, Any]]]  # attack -> (picked trial, its params)


def _nested_entries(args: argparse.Namespace, victims: list[Any]) -> tuple[dict[str, Picks], dict[str, list[Entry]]]:
    """The committee study's strictly held-out picks (a search per attack fold), if it ran, and
    the rows they give per victim key."""
    if not args.committee_space:
        return {COMMITTEE: {}, NESTED: {}}, {}
    from bdx_study.space import load_space

    cspec = load_space(args.committee_space)
    nested = {COMMITTEE: _nested_loao(cspec, "committee"), NESTED: _nested_loao(cspec, "badexpert")}
    families = {COMMITTEE: "committee", NESTED: "badexpert"}
    entries = {
        v.key: [(label, families[label], p[v.attack.name][1]) for label, p in nested.items() if v.attack.name in p]
        for v in victims
    }
    return nested, entries


def main() -> int:
    args = parse_args()
    from bdx_study.detectors import DETECTORS
    from bdx_study.space import load_space

    spec = load_space(args.space)
    earlier = _earlier_rows(args.out.with_suffix(".csv"), args.earlier)
    families = [f for f in (args.families or DETECTORS.names()) if f not in args.earlier and f != "committee"]
    t0 = time.perf_counter()
    victims = [v for v in spec.victim_configs() if args.attacks is None or v.attack.name in args.attacks]
    cut = (args.stages, args.selection_inputs, args.eval_inputs)
    # 1. Every family at its defaults: needs only the study's victims (a launch may still be
    # running its trials; fits and outputs land in the benchmark's stage store, so a rerun
    # rescores nothing).
    defaults: list[Entry] = [(PAPER if f == "badexpert" else f, f, {}) for f in families]
    jobs = [(args.space, v.key, defaults, *cut) for v in victims]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        rows = [r for part in pool.imap_unordered(_victim_rows, jobs) for r in part]
        # 2. BaDExpert at the study's robust defaults picked without the column's attack: needs
        # the study's finished trials; scored here on the same inputs as every other row.
        try:
            picks = _robust_loao(spec)
        except FileNotFoundError:  # the committee study's strictly held-out BaDExpert rows stand in for them
            print(f"no finished trials at {spec.study_dir}: no '{ROBUST}' rows (launch {args.space} for them)")
            picks = {}
        jobs = [
            (args.space, v.key, [(ROBUST, "badexpert", picks[v.attack.name][1])], *cut)
            for v in victims
            if v.attack.name in picks
        ]
        # 3. The committee study's strictly held-out picks.
        nested, entries = _nested_entries(args, victims)
        jobs += [(args.space, key, e, *cut) for key, e in entries.items() if e]
        rows += [r for part in pool.imap_unordered(_victim_rows, jobs) for r in part]
    for r in rows:
        if r["family"] == ROBUST:
            r["picked_trial"] = picks[r["attack"]][0]
        elif r["family"] in nested:
            r["picked_trial"] = nested[r["family"]][r["attack"]][0]
    seconds = time.perf_counter() - t0
    write_report(pd.concat([pd.DataFrame(rows), earlier], ignore_index=True), spec, args, seconds)
    return 0


def _pivot(table: pd.DataFrame, value: str, order: list[str], attacks: list[str]) -> pd.DataFrame:
    p = table.pivot_table(index="family", columns="attack", values=value, aggfunc="first")
    return p.reindex(index=[f for f in order if f in p.index], columns=[a for a in attacks if a in p.columns])


def _md(p: pd.DataFrame, fmt: str = "{:.3f}", extra: dict[str, pd.Series] | None = None) -> list[str]:
    cols = list(p.columns) + list(extra or {})
    lines = ["| family | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for fam, r in p.iterrows():
        cells = ["-" if pd.isna(v) else fmt.format(v) for v in r]
        cells += [fmt.format(s[fam]) for s in (extra or {}).values()]
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return lines


def _committee_targets(table: pd.DataFrame, attacks: list[str], backdoored: list[str], target: float) -> list[str]:
    """The committee's rows against the issue's targets (strictly held out, correct-only)."""
    t = table[table["family"] == COMMITTEE].set_index("attack")
    if t.empty:
        return []
    auc = t.loc[[a for a in backdoored if a in t.index], "auroc_correct_only"]
    tpr = t.loc[[a for a in backdoored if a in t.index], "tpr_at_1pct_fpr_correct_only"]
    fpr_ok = {
        a: bool(r["fpr_at_threshold_low_correct_only"] <= target <= r["fpr_at_threshold_high_correct_only"])
        or bool(r["fpr_at_threshold_correct_only"] <= target)
        for a, r in t.iterrows()
    }
    served = (t["bare_forward_seconds_per_input"] / t["served_seconds_per_input"]).mean()
    missing = [a for a in attacks if a not in t.index]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = [
        "",
        "## The committee (nested LOAO) against its targets",
        "",
        f"- worst AUROC {auc.min():.3f} on {auc.idxmin()} (target >= 0.97): {verdict(auc.min() >= 0.97)}",
        f"- mean AUROC {auc.mean():.3f} (target >= 0.99): {verdict(auc.mean() >= 0.99)}",
        f"- TPR at 1% FPR {tpr.min():.3f} at worst, on {tpr.idxmin()} (target >= 0.90 on every attack): "
        f"{verdict(tpr.min() >= 0.90)}"
        + (
            f"; below 0.90 on {', '.join(f'{a} {v:.3f}' for a, v in tpr[tpr < 0.90].items())}"
            if (tpr < 0.90).any()
            else ""
        ),
        f"- realized FPR at the threshold inside its 95% interval of the target (or below it) on "
        f"{sum(fpr_ok.values())} of {len(fpr_ok)} victims (clean victim included): "
        f"{verdict(all(fpr_ok.values()))}"
        + (f"; not on {', '.join(a for a, ok in fpr_ok.items() if not ok)}" if not all(fpr_ok.values()) else ""),
        f"- served throughput {served:.3f} of one bare forward pass (target >= 0.25): {verdict(served >= 0.25)}",
    ]
    if missing:
        lines.append(f"- no committee row for {', '.join(missing)} (its fold did not finish)")
    return lines


def _losses(auroc: pd.DataFrame, label: str, backdoored: list[str]) -> list[str]:
    """The attacks where another row beats ``label``'s AUROC (the figures said with enough digits
    to show the difference: 0.9997 < 1.0000, not 1.000 < 1.000)."""
    own, others = auroc.loc[label], auroc.drop(index=[label])
    losses = []
    for a in backdoored:
        if a in others.columns and pd.notna(own[a]) and others[a].max() > own[a] + 1e-9:
            d = 3
            while f"{own[a]:.{d}f}" == f"{others[a].max():.{d}f}" and d < 6:
                d += 1
            losses.append(f"{a}: {label} {own[a]:.{d}f} < {others[a].idxmax()} {others[a].max():.{d}f}")
    return [f"Where {label} loses to another detector:", "", *([f"- {x}" for x in losses] or ["- nowhere"]), ""]


def _intro(args: argparse.Namespace, protocol: Any, attacks: list[str], seconds: float) -> list[str]:
    """The report's heading: how it was made, on which victims, under which protocol."""
    backdoored = [a for a in attacks if a != "none"]
    return [
        "# Detectors compared: every family on every Fashion-MNIST victim, one protocol",
        "",
        f"Made by `python benchmarks/detectors.py {' '.join(sys.argv[1:])}` after `bdx-study launch --space "
        f"{args.space}`, on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, no GPU), "
        f"{seconds / 60:.0f} minutes of scoring with {args.workers} worker processes.",
        "",
        f"Victims: the zoo study's ({len(backdoored)} attacks"
        + (" and a clean victim" if "none" in attacks else "")
        + "; Fashion-MNIST, small CNN; "
        "docs/victims.md). Protocol, the same for every family: "
        f"|D_c| = {protocol.clean_set_size} reserved clean images "
        f"({protocol.clean_set_size - protocol.calibration_images} to fit on, {protocol.calibration_images} to "
        f"calibrate on), a {protocol.threshold_rule} threshold at a {protocol.target_fpr:.0%} target FPR; every "
        "figure on each victim's evaluation split, never seen by any fit, threshold or search (the selection split, "
        f"which no figure here uses, is cut to its first {args.selection_inputs} inputs per part, and every "
        f"family scores the same first {args.eval_inputs} clean and {args.eval_inputs} triggered evaluation "
        "inputs). Baselines run at "
        "their published defaults (`bdx-study list`); BaDExpert at the paper's CIFAR-10 values and at the study's "
        "robust defaults picked leave-one-attack-out (LOAO: the column's attack was not among the victims the "
        "pick was made on; under TPE the candidates were still proposed by a search that saw every victim). "
        f"From `{args.committee_space}`, strictly held out (nested LOAO: the pick of a whole search run without "
        "the column's attack): the committee of BaDExpert and TED, and BaDExpert alone under the same search."
        + (
            f" Rows marked{EARLIER} ({', '.join(args.earlier)}) are kept from the CSV of the previous run of this "
            "benchmark (victims of the same recipes and seeds, trained in an earlier session), not scored again: their "
            "cost figures are that run's and their served throughput was not measured."
            if args.earlier
            else ""
        ),
        "",
    ]


def _costs(table: pd.DataFrame, order: list[str]) -> list[str]:
    """The cost table: passes, scoring time and throughput per scored input, fit time per victim."""
    lines = [
        "## Cost per scored input (mean over victims)",
        "",
        "Forward and backward passes of victim-architecture networks (the model's own forward included), "
        "scoring wall time, and throughput relative to one bare forward pass of the model (1.0 = as fast as "
        "serving the model alone); fit time is per victim.",
        "",
        "| family | forward passes | backward passes | scoring ms / input | throughput vs one forward | served "
        "ms / input | served throughput vs one forward | fit s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fam in [f for f in order if f in set(table["family"])]:
        t = table[table["family"] == fam]
        rel = (t["bare_forward_seconds_per_input"] / t["score_seconds_per_input"]).mean()
        served_s = t["served_seconds_per_input"] if "served_seconds_per_input" in t else pd.Series(dtype=float)
        served = (t["bare_forward_seconds_per_input"] / served_s).mean()
        ms, thr = ("-", "-") if pd.isna(served) else (f"{1000 * served_s.mean():.3f}", f"{served:.4f}")
        lines.append(
            f"| {fam} | {t['forward_passes_per_input'].mean():.1f} | {t['backward_passes_per_input'].mean():.1f} | "
            f"{1000 * t['score_seconds_per_input'].mean():.3f} | {rel:.4f} | {ms} | {thr} | "
            f"{t['fit_seconds'].mean():.1f} |"
        )
    return lines


def write_report(table: pd.DataFrame, spec: Any, args: argparse.Namespace, seconds: float) -> None:
    attacks = sorted(a for a in table["attack"].unique() if a != "none") + (
        ["none"] if "none" in set(table["attack"]) else []
    )
    backdoored = [a for a in attacks if a != "none"]
    first = [COMMITTEE, NESTED, ROBUST, ROBUST + EARLIER, PAPER, PAPER + EARLIER]
    order = first + sorted(f for f in table["family"].unique() if f not in first)
    auroc = _pivot(table, "auroc_correct_only", order, backdoored)
    summary = {"worst": auroc.min(axis=1), "mean": auroc.mean(axis=1)}
    best_mean, best_worst = summary["mean"].idxmax(), summary["worst"].idxmax()
    _, _, protocol = spec.trial_config({"detector": "badexpert"})
    lines = [
        *_intro(args, protocol, attacks, seconds),
        "## AUROC (correct-only protocol), from continuous scores",
        "",
        *_md(auroc, extra=summary),
        "",
        f"Best mean AUROC: **{best_mean}** ({summary['mean'][best_mean]:.3f}); best worst case: **{best_worst}** "
        f"({summary['worst'][best_worst]:.3f}).",
        "",
    ]
    for label in (COMMITTEE, ROBUST, ROBUST + EARLIER):
        if label in auroc.index:
            lines += _losses(auroc, label, backdoored)
    lines += [
        "## TPR at 1% FPR (correct-only; the best on each victim's own ROC: a property of the scores)",
        "",
        *_md(_pivot(table, "tpr_at_1pct_fpr_correct_only", order, backdoored)),
        "",
        f"## FPR measured at the calibrated threshold (correct-only; target {protocol.target_fpr:.0%})",
        "",
        *_md(_pivot(table, "fpr_at_threshold_correct_only", order, attacks)),
        "",
        *_costs(table, order),
        *_committee_targets(table, attacks, backdoored, protocol.target_fpr),
    ]
    write_keeping_tail(args.out, lines, "## Notes", "\n## Notes\n\n(written by hand)\n")
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    print(f"wrote {args.out} and {args.out.with_suffix('.csv')}")


if __name__ == "__main__":
    raise SystemExit(main())
