"""What a user sees of a study in the MLflow UI and in optuna-dashboard, read in a real headless
Chromium (a manual check, not a test: nothing imports it).

    python benchmarks/browser_views.py --mlflow-url http://127.0.0.1:5000 --dashboard-url http://127.0.0.1:8080 \
        --link 'LINK THE LAUNCH PRINTED' --out shots/

Start the two servers first, on the quickstart's stores (``mlflow ui --backend-store-uri
sqlite:///mlflow.db``; ``optuna-dashboard sqlite:///bdx_runs/studies/quickstart/optuna.db``).
Needs ``pip install playwright`` and a Chromium (``--chromium``, default /usr/bin/chromium; no
``playwright install``). What the pages show is read from their DOM; what they should show is
read from the servers' own REST APIs (MLflow's runs/search, optuna-dashboard's /api/studies).

1. MLflow, the link the launch prints: opens in the model-training view; lists the trials that
   ran to the end (tag ``bdx.status = complete``), best objective first, the winner on top; each
   row shows its objective as the run's metrics hold it (the study's selection key, in the run
   name ``badexpert-1d8ec7a5 | 0.9898 | infeasible`` or in a column), not cut off.
2. MLflow, the study's run: its best-trial tag; its description starts with a link to the winning
   trial's run, seen without scrolling, that opens that run.
3. MLflow, a trial run: searched parameters marked apart (tag ``bdx.searched``, description), its
   refits listed as child runs; the run list's expand buttons (study > trials > refits).
4. optuna-dashboard: every study, and in each the trials' order, start and end times, states, the
   infeasible trials marked (Optuna's constraints), user attribute names (``selection/...``,
   ``evaluation/...``), the best trial card, the objective's name, the intermediate values plot
   (pruned trials drawn, each trial's last intermediate value its value).

Prints one line per check, ``PASS``, ``FAIL`` or ``NOTE`` and what was seen, and saves a
screenshot of every page under ``--out``. Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TIMEOUT_MS = 45_000  # a page (or the element a check waits for) that takes longer is reported, not waited on
SETTLE_S = 1.5  # after the awaited element shows, for the rest of the page's requests to land
SPLIT_PREFIXES = ("selection/", "evaluation/")
PLAIN_ATTRS = {"trial_id", "feasible", "stopped_at"}  # user attributes that name no split
ROWS = ".ag-pinned-left-cols-container .ag-row"  # the runs table's rows (ag-grid: the pinned run-name part)
NAME_HEAD = re.compile(r"^(-?\d+\.\d+|undefined) (?:(infeasible|pruned)(?: \d+/\d+)? )?\S+$")  # "0.9212 pruned 1/4 x-1"
VISIBLE_CHARS = 20  # what MLflow's Run Name column shows of a name at its default width (measured: about 23)
Run = dict[str, Any]


@dataclass
class Report:
    """The checks' lines, printed as they come."""

    lines: list[str] = field(default_factory=list)
    failed: int = 0

    def add(self, verdict: str, check: str, seen: str) -> None:
        line = f"{verdict:4} {check}: {seen}"
        self.lines.append(line)
        self.failed += verdict == "FAIL"
        print(line, flush=True)

    def check(self, ok: bool, check: str, seen: str) -> bool:
        self.add("PASS" if ok else "FAIL", check, seen)
        return ok


def get_json(url: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """GET ``url`` (POST ``body`` as JSON when given) and parse the JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - the user's own local servers
        return json.loads(r.read().decode())


def wait_until_up(url: str, what: str, timeout: float = 60.0) -> None:
    """Return once ``url`` answers; exit with a message naming ``what`` when it never does."""
    end = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - the user's own local servers
                if r.status < 500:
                    return
        except OSError as e:
            if time.monotonic() > end:
                sys.exit(f"{what} at {url} does not answer ({e}); start it first")
        time.sleep(1.0)


def open_page(page: Any, url: str, wait_text: str | None, report: Report, check: str) -> bool:
    """Open ``url`` and wait for ``wait_text`` to show; False (and a FAIL line) when it never does."""
    page.goto("about:blank")
    try:
        page.goto(url, wait_until="load", timeout=TIMEOUT_MS)
        if wait_text:
            page.get_by_text(wait_text).first.wait_for(timeout=TIMEOUT_MS)
        time.sleep(SETTLE_S)
        return True
    except Exception as e:  # playwright's TimeoutError and navigation errors alike
        report.add(
            "FAIL", check, f"{url} did not show {wait_text!r} within {TIMEOUT_MS // 1000} s ({type(e).__name__})"
        )
        return False


def shoot(page: Any, out: Path, name: str, full: bool = True) -> None:
    path = out / f"{name}.png"
    page.screenshot(path=str(path), full_page=full)
    print(f"     screenshot {path}", flush=True)


# ------------------------------------------------------------------------------------- MLflow


def tags(run: Run) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def metric(run: Run, key: str) -> float:
    return next((float(m["value"]) for m in run["data"].get("metrics", []) if m["key"] == key), math.nan)


def param(run: Run, key: str) -> str | None:
    return next((p["value"] for p in run["data"].get("params", []) if p["key"] == key), None)


def name(run: Run | None) -> str:
    return str(run["info"].get("run_name", "")) if run else "?"


def describe_trial(run: Run) -> str:
    """A trial's objective, status and feasibility, as its run records them."""
    t = tags(run)
    bits = [f"objective {metric(run, 'objective'):.4f}", t.get("bdx.status", "status ?")]
    bits += [f"victims {t['bdx.victims']}"] if t.get("bdx.victims") else []
    bits += ["infeasible"] if metric(run, "feasible") == 0.0 else []
    return ", ".join(bits)


@dataclass
class Store:
    """What the MLflow store holds for the study (its REST API): the truth the pages are read against."""

    base: str
    experiment_id: str
    runs: list[Run]

    @classmethod
    def load(cls, base: str, experiment_id: str) -> Store:
        runs: list[Run] = []
        body: dict[str, Any] = {"experiment_ids": [experiment_id], "max_results": 1000}
        while True:
            got = get_json(f"{base}/ajax-api/2.0/mlflow/runs/search", body)
            runs += got.get("runs", [])
            if not got.get("next_page_token"):
                return cls(base, experiment_id, runs)
            body["page_token"] = got["next_page_token"]

    def of_kind(self, kind: str, parent: str | None = None) -> list[Run]:
        return [
            r
            for r in self.runs
            if tags(r).get("bdx.kind") == kind
            and r["info"].get("lifecycle_stage") == "active"
            and (parent is None or tags(r).get("mlflow.parentRunId") == parent)
        ]

    def by_id(self, run_id: str | None) -> Run | None:
        return next((r for r in self.runs if r["info"]["run_id"] == run_id), None)

    def url(self, run_id: str) -> str:
        return f"{self.base}/#/experiments/{self.experiment_id}/runs/{run_id}"


def wait_for_rows(page: Any) -> bool:
    """Wait until the runs table has rows (its footer shows "matching runs" while it still loads)."""
    try:
        page.locator(f'{ROWS} a[href*="/runs/"]').first.wait_for(timeout=TIMEOUT_MS)
    except Exception:
        return False
    time.sleep(SETTLE_S)
    return True


def grid_rows(page: Any) -> list[tuple[str, bool]]:
    """The runs table's rows top to bottom: each run's name and whether the table cuts it off (the
    link, or an element in it, narrower than its text: MLflow ends it with an ellipsis)."""
    got = page.evaluate(
        """(sel) => Array.from(document.querySelectorAll(sel))
            .sort((a, b) => +a.getAttribute('row-index') - +b.getAttribute('row-index'))
            .map(r => {
                const a = r.querySelector('a[href*="/runs/"]');
                if (!a) return ['', false];
                const cut = [a, ...a.querySelectorAll('*')]
                    .some(e => e.clientWidth > 0 && e.scrollWidth > e.clientWidth);
                return [a.innerText.trim(), cut]; })""",
        ROWS,
    )
    return [(str(n), bool(c)) for n, c in got if n]


def grid_headers(page: Any) -> list[str]:
    return page.evaluate(
        "() => Array.from(document.querySelectorAll('.ag-header-cell')).map(e => e.innerText.trim()).filter(t => t)"
    )


def check_link(page: Any, store: Store, parent: Run, link: str, out: Path, report: Report) -> None:
    """The printed link: the page opens in the model-training view, with the trials' table."""
    if not open_page(page, link, "matching runs", report, "mlflow.link.opens"):
        shoot(page, out, "mlflow_01_link")
        return
    loaded = wait_for_rows(page)
    shoot(page, out, "mlflow_01_link", full=False)
    report.check(loaded, "mlflow.link.opens", page.url + ("" if loaded else f": no rows after {TIMEOUT_MS // 1000} s"))
    genai = in_genai_view(page)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(link).fragment.partition("?")[2])
    report.check(
        not genai,
        "mlflow.link.workflow",
        ("the GenAI view's side bar (Evaluation runs, Judges, Prompts...)" if genai else "model-training side bar")
        + f"; the link sets workflowType={query.get('workflowType', ['(unset)'])[0]}",
    )
    check_trial_list(page, store, parent, report)


def in_genai_view(page: Any) -> bool:
    """Whether the page is in MLflow 3's GenAI view: its side bar names the GenAI pages."""
    nav = page.inner_text("body")
    return all(w in nav for w in ("Judges", "Prompts", "Evaluation runs"))


def check_trial_list(page: Any, store: Store, parent: Run, report: Report) -> None:
    """The link's table: the complete trials, sorted by the objective, the winner first."""
    trials = {name(r): r for r in store.of_kind("trial", parent["info"]["run_id"])}
    complete = {n for n, r in trials.items() if tags(r).get("bdx.status") == "complete"}
    rows = grid_rows(page)
    shown = [n for n, _ in rows]
    extra = [f"{n} ({tags(trials[n]).get('bdx.status')})" if n in trials else n for n in shown if n not in complete]
    missing = sorted(complete - set(shown))
    report.check(
        not extra and not missing,
        "mlflow.link.trials_listed",
        f"{len(shown)} rows; {len(complete)} of the study's {len(trials)} trial runs tagged bdx.status = complete"
        + (f"; missing {missing}" if missing else "")
        + (f"; not complete: {extra}" if extra else ""),
    )
    mode = param(parent, "objective_mode") or "max"
    values = [metric(trials[n], "objective") for n in shown if n in trials]
    finite = [v for v in values if math.isfinite(v)]
    report.check(
        finite == sorted(finite, reverse=mode == "max"),
        "mlflow.link.sorted",
        f"metric objective top to bottom ({mode}): {[round(v, 4) for v in values]}",
    )
    check_objective_shown(page, rows, trials, param(parent, "objective") or "objective", report)
    winner = name(store.by_id(tags(parent).get("bdx.best_trial_run")))
    if winner not in shown:
        report.add("FAIL", "mlflow.link.winner_first", f"the winning trial's run ({winner}) is not in the table")
        return
    above = [f"{n} ({describe_trial(trials[n])})" for n in shown[: shown.index(winner)] if n in trials]
    report.check(not above, "mlflow.link.winner_first", f"winner {winner} at row {len(above) + 1}; above it: {above}")


def check_objective_shown(
    page: Any, rows: list[tuple[str, bool]], trials: dict[str, Run], key: str, report: Report
) -> None:
    """Each row shows its objective (the run's metric ``key``): in a column, or at the start of its
    name, then ``infeasible`` / ``pruned k/n`` as the run's status says, within what the column
    shows of a name even when it cuts the rest off."""
    headers = grid_headers(page)
    column = [h for h in headers if h.lower() in ("objective", key.lower())]
    wrong = []
    for n, _ in rows:
        run = trials.get(n, {"data": {}})
        v = metric(run, key)
        pruned, feasible = tags(run).get("bdx.status") == "pruned", metric(run, "feasible") != 0.0
        want = (
            f"{v:.4f}" if math.isfinite(v) else "undefined",
            "pruned" if pruned else None if feasible else "infeasible",
        )
        got = NAME_HEAD.match(n)
        if not got or (got.group(1), got.group(2)) != want:
            wrong.append(f"{n} (store: {key} {want[0]}{', ' + want[1] if want[1] else ''})")
    report.check(
        bool(rows) and not wrong,
        "mlflow.link.objective_in_names",
        f"{len(rows) - len(wrong)}/{len(rows)} run names start with their {key} as the store holds it"
        + (f"; not: {wrong}" if wrong else ""),
    )
    cut = [n for n, c in rows if c]
    hidden = [
        n for n in cut if (m := NAME_HEAD.match(n)) and len(n[: m.end(2) if m.group(2) else m.end(1)]) > VISIBLE_CHARS
    ]
    report.check(
        bool(column) or (bool(rows) and not wrong and not hidden),
        "mlflow.link.objective_visible",
        f"{len(cut)}/{len(rows)} names cut off by the Run Name column's width, the objective and status in front of "
        f"the cut in all but {hidden or 'none'}; columns: {headers}",
    )


def _infeasible_mark(run: Run) -> str | None:
    return "infeasible" if metric(run, "feasible") == 0.0 else None


def check_study_run(page: Any, store: Store, parent: Run, out: Path, report: Report) -> None:
    """The study's run: the best-trial tag, and the description's link to the winning trial's run,
    first thing in the description and seen without scrolling."""
    if not open_page(page, store.url(parent["info"]["run_id"]), "About this run", report, "mlflow.study.opens"):
        return
    shoot(page, out, "mlflow_02_study_run", full=False)
    text = page.inner_text("body")
    t = tags(parent)
    best, best_run = t.get("bdx.best_trial", ""), t.get("bdx.best_trial_run", "")
    report.check(
        bool(best) and "bdx.best_trial" in text and best in text,
        "mlflow.study.best_tag",
        f"tag bdx.best_trial = {best!r} {'shown' if best and best in text else 'not shown'} on the run page",
    )
    links = page.locator(f'.note-editor-preview-content a[href*="/runs/{best_run}"]')
    if not best_run or links.count() == 0:
        report.add("FAIL", "mlflow.study.best_link", "no link to the winning trial's run in the description")
        return
    anchor, note = links.first, t.get("mlflow.note.content", "")
    box, height = anchor.bounding_box(), (page.viewport_size or {}).get("height", 0)
    y = box["y"] + box["height"] if box else math.inf
    titled = f"| best: {name(store.by_id(best_run))}" in text  # the run's name, the page's title
    report.check(
        note.startswith("Best trial:") and (y <= height or titled),
        "mlflow.study.best_link",
        f"description starts {note[:12]!r}; link {anchor.inner_text().strip()!r} -> {anchor.get_attribute('href')} "
        f"ends {y:.0f} px down a {height} px window{'' if y <= height else ' (below the fold)'}; the page's title "
        f"{'names' if titled else 'does not name'} the best trial "
        f"(target={anchor.get_attribute('target')}); page opened in the "
        f"{'GenAI' if in_genai_view(page) else 'model-training'} view",
    )
    opened = follow(page, anchor, anchor.get_attribute("target") == "_blank")
    try:
        opened.get_by_text("About this run").first.wait_for(timeout=TIMEOUT_MS)
        time.sleep(SETTLE_S)
        shoot(opened, out, "mlflow_03_best_trial_run", full=False)
        winner = store.by_id(best_run)
        report.check(
            f"/runs/{best_run}" in opened.url and name(winner) in opened.inner_text("body"),
            "mlflow.study.best_link_opens",
            f"{'a new tab' if opened is not page else 'the same tab'} at {opened.url.split('#')[-1]} showing "
            f"{name(winner)} ({describe_trial(winner) if winner else 'not in the store'}); in the "
            f"{'GenAI' if in_genai_view(opened) else 'model-training'} view",
        )
    except Exception as e:
        report.add("FAIL", "mlflow.study.best_link_opens", f"the link opened {opened.url} ({type(e).__name__})")
    finally:
        if opened is not page:
            opened.close()


def follow(page: Any, anchor: Any, new_tab: bool) -> Any:
    """Click ``anchor``; the page it opened (a new tab for target=_blank)."""
    if new_tab:
        with page.context.expect_page(timeout=TIMEOUT_MS) as info:
            anchor.click()
        return info.value
    before, end = page.url, time.monotonic() + TIMEOUT_MS / 1000
    anchor.click()
    while page.url == before and time.monotonic() < end:  # a hash route: no load event to wait for
        time.sleep(0.25)
    return page


def check_trial_run(page: Any, store: Store, trial: Run, out: Path, report: Report) -> None:
    """A trial's run: searched params marked apart, its refits listed as child runs."""
    if not open_page(page, store.url(trial["info"]["run_id"]), "About this run", report, "mlflow.trial.opens"):
        return
    shoot(page, out, "mlflow_04_trial_run")
    text = page.inner_text("body")
    searched, note = tags(trial).get("bdx.searched", ""), tags(trial).get("mlflow.note.content", "")
    report.check(
        bool(searched) and "bdx.searched" in text and searched in text,
        "mlflow.trial.searched_tag",
        f"{name(trial)}: tag bdx.searched = {searched!r} {'shown' if searched and searched in text else 'not shown'}",
    )
    first_line = note.split(". Every other")[0]
    report.check(
        bool(note) and first_line[:60] in text,
        "mlflow.trial.description",
        f"description shown: {first_line!r}" if note else "the run has no description",
    )
    n_searched = len([s for s in searched.split(", ") if s])
    metrics = text.split("Metrics (", 1)[1] if "Metrics (" in text else ""
    report.add(
        "NOTE",
        "mlflow.trial.tables",
        f"the Parameters table lists {len(trial['data'].get('params', []))} params flat ({n_searched} searched, "
        f"marked only by the tag and the description); Metrics ({metrics.split(')')[0]}) lists first "
        f"{[w for w in metrics.split() if '/' in w or w in ('objective', 'feasible')][:4]}",
    )
    refits = store.of_kind("refit", trial["info"]["run_id"])
    children = text.split("Child runs", 1)[1][:400] if "Child runs" in text else ""
    report.check(
        bool(refits) and all(name(r) in children for r in refits),
        "mlflow.trial.refits_as_children",
        f"{len(refits)} refit run(s) in the store under {name(trial)}: {[name(r) for r in refits]}; "
        f"'Child runs' shows: {' '.join(children.split()[:8]) or '(no Child runs field)'}",
    )
    if refits and open_page(page, store.url(refits[0]["info"]["run_id"]), "About this run", report, "mlflow.refit"):
        shoot(page, out, "mlflow_05_refit_run")
        text = page.inner_text("body")
        shown = text.split("Parent run", 1)[1][:120] if "Parent run" in text else ""
        report.check(
            name(trial) in shown,
            "mlflow.refit.parent",
            f"{name(refits[0])}: 'Parent run' shows {' '.join(shown.split()[:5]) or '(no Parent run field)'}",
        )


def expand_row(page: Any, run_name: str) -> bool:
    """Click the expand button of the runs table's row named ``run_name``; False when it has none."""
    row = page.locator(ROWS).filter(has=page.get_by_role("link", name=run_name, exact=True))
    button = row.locator('button[data-component-id*="runnamecellrenderer"]')
    if row.count() == 0 or button.count() == 0:
        return False
    button.first.click()
    time.sleep(SETTLE_S)
    return True


def row_levels(page: Any) -> dict[str, int]:
    """Run name -> nesting level of every row the table shows (MLflow indents a child run's name; the
    level is the rank of the name's indentation among the rows)."""
    got = page.evaluate(
        """(sel) => Array.from(document.querySelectorAll(sel)).map(r => {
            const a = r.querySelector('a[href*="/runs/"]');
            return [a ? a.innerText.trim() : '', a ? Math.round(a.getBoundingClientRect().left) : -1]; })""",
        ROWS,
    )
    lefts = sorted({x for n, x in got if n})
    return {n: lefts.index(x) for n, x in got if n}


def check_nesting(page: Any, store: Store, parent: Run, trial: Run, out: Path, report: Report) -> None:
    """The plain run list: does the link's filter stick; the study run expands to its trials, a trial
    to its refits (in a fresh browser profile, so that no remembered filter hides the study's run)."""
    url = f"{store.base}/#/experiments/{store.experiment_id}/runs?workflowType=machine_learning"
    if open_page(page, url, "matching runs", report, "mlflow.list.opens") and wait_for_rows(page):
        kept = page.evaluate(
            """() => Array.from(document.querySelectorAll('input')).map(i => i.value)
                .filter(v => /(tags|metrics|params)\\./.test(v)).join(' | ')"""
        )
        report.add(
            "NOTE" if kept else "PASS",
            "mlflow.list.filter_sticks",
            f"the plain runs page, opened after the link in the same browser, filters by {kept!r}"
            if kept
            else "the plain runs page shows no filter",
        )
    fresh = page.context.browser.new_context(viewport=page.viewport_size).new_page()
    try:
        if not (open_page(fresh, url, "matching runs", report, "mlflow.list.opens") and wait_for_rows(fresh)):
            return
        top = row_levels(fresh)
        expanded = expand_row(fresh, name(parent))
        expanded = expand_row(fresh, name(trial)) and expanded
        fresh.get_by_role("link", name=name(trial), exact=True).first.scroll_into_view_if_needed()
        shoot(fresh, out, "mlflow_06_run_list_nested", full=False)
        levels = row_levels(fresh)
        refits = [name(r) for r in store.of_kind("refit", trial["info"]["run_id"])]
        report.check(
            expanded and levels.get(name(trial)) == 1 and all(levels.get(r) == 2 for r in refits),
            "mlflow.list.nesting",
            f"unexpanded: {len(top)} top row(s) {sorted(top)[:5]}; after expanding {name(parent)} and "
            f"{name(trial)}: it at level {levels.get(name(trial))}, refits at {[(r, levels.get(r)) for r in refits]}",
        )
    finally:
        fresh.context.close()


def mlflow_checks(page: Any, args: argparse.Namespace, report: Report) -> None:
    base = args.mlflow_url.rstrip("/")
    got, want = urllib.parse.urlsplit(args.link), urllib.parse.urlsplit(base)
    link = args.link
    if got.netloc != want.netloc:  # the launch prints port 5000
        report.add("NOTE", "mlflow.link.host", f"the link names {got.netloc}; opened on {want.netloc} instead")
        link = urllib.parse.urlunsplit((want.scheme, want.netloc, got.path, got.query, got.fragment))
    match = re.search(r"#/experiments/([^/?]+)", link)
    if not match:
        report.add("FAIL", "mlflow.link.parse", f"no experiment id in {link}")
        return
    store = Store.load(base, match.group(1))
    parents = [r for r in store.of_kind("study") if tags(r).get("bdx.best_trial_run")] or store.of_kind("study")
    if not parents:
        report.add("FAIL", "mlflow.store", f"no study run (tag bdx.kind = study) in experiment {store.experiment_id}")
        return
    parent = max(parents, key=lambda r: int(r["info"].get("start_time", 0)))
    best_run = tags(parent).get("bdx.best_trial_run")
    report.add(
        "NOTE",
        "mlflow.store",
        f"experiment {store.experiment_id}: {len(store.runs)} runs; study run {name(parent)} "
        f"({parent['info']['run_id']}), best trial {name(store.by_id(best_run))}",
    )
    check_link(page, store, parent, link, args.out, report)
    check_study_run(page, store, parent, args.out, report)
    trials = store.of_kind("trial", parent["info"]["run_id"])
    with_refits = [t for t in trials if store.of_kind("refit", t["info"]["run_id"])]
    trial = next((t for t in with_refits if t["info"]["run_id"] == best_run), None)
    trial = trial or next(iter(with_refits or trials), None)
    if trial is None:
        report.add("FAIL", "mlflow.trial", "the study run has no trial runs")
        return
    check_trial_run(page, store, trial, args.out, report)
    check_nesting(page, store, parent, trial, args.out, report)


# ----------------------------------------------------------------------------- optuna-dashboard


def attr(trial: dict[str, Any], key: str) -> str | None:
    return next((a["value"] for a in trial.get("user_attrs", []) if a["key"] == key), None)


def infeasible(trial: dict[str, Any]) -> bool:
    """Whether the search found the trial infeasible (its ``feasible`` attribute)."""
    return attr(trial, "feasible") == "False"


def marked(trial: dict[str, Any]) -> bool:
    """Whether optuna-dashboard takes the trial for infeasible (a constraint above 0)."""
    return any(float(c) > 0 for c in trial.get("constraints") or [])


def last_intermediate(trial: dict[str, Any]) -> float | None:
    steps = trial.get("intermediate_values") or []
    return float(max(steps, key=lambda s: s["step"])["value"]) if steps else None


def check_times(study: str, trials: list[dict[str, Any]], report: Report) -> None:
    """Trials numbered in the order they ran; real start and end times."""
    starts = [str(t.get("datetime_start") or "") for t in trials]
    report.check(
        all(starts) and starts == sorted(starts),
        f"optuna.{study}.order",
        f"start times by trial number: {[s[11:19] or None for s in starts]}",
    )
    stamp = datetime.datetime.fromisoformat
    spans = [
        (stamp(t["datetime_complete"]) - stamp(t["datetime_start"])).total_seconds()
        for t in trials
        if t.get("datetime_start") and t.get("datetime_complete")
    ]
    ok = len(spans) == len(trials) and all(s >= 0 for s in spans) and any(s > 0 for s in spans)
    report.add(
        ("PASS" if len(set(spans)) > 1 else "NOTE") if ok else "FAIL",
        f"optuna.{study}.times",
        f"{len(spans)}/{len(trials)} trials with start and end; durations (s): {[round(s, 1) for s in spans]}",
    )


def check_attrs(study: str, summary: dict[str, Any], report: Report) -> None:
    keys = [a["key"] for a in summary.get("union_user_attrs", [])]
    unnamed = [k for k in keys if k not in PLAIN_ATTRS and not k.startswith(SPLIT_PREFIXES)]
    report.check(
        not unnamed,
        f"optuna.{study}.user_attrs",
        f"{len(keys)} names, e.g. {keys[:3]}; without a split: {unnamed or 'none'}"
        + ("; the trial detail lists evaluation/... above selection/..." if keys and keys[0] < "selection/" else ""),
    )


def check_states(page: Any, study: str, trials: list[dict[str, Any]], report: Report) -> None:
    """The states the trial list shows against the study's."""
    shown = re.findall(r"^Trial (\d+)\n(Complete|Pruned|Fail|Running|Waiting)", page.inner_text("body"), re.M)
    truth = [(str(t["number"]), t["state"]) for t in trials]
    counts = {s: sum(1 for _, x in truth if x == s) for s in sorted({x for _, x in truth})}
    report.check(
        sorted(shown) == sorted(truth),
        f"optuna.{study}.states",
        f"trial list shows {len(shown)} trials; states in the study: {counts}",
    )


def check_history(page: Any, study: str, data: dict[str, Any], report: Report) -> None:
    """The history page: the best trial card, the objective's name, the infeasible trials marked."""
    text = page.inner_text("body")
    trials = {t["number"]: t for t in data["trials"]}
    card = re.search(r"Best Trial \(number=(\d+)\)\s*\n\s*([-\d.e]+)", text)
    feasible_done = [t for t in trials.values() if t["state"] == "Complete" and not infeasible(t)]
    pick = max if (data.get("directions") or ["maximize"])[0] == "maximize" else min
    want = pick(feasible_done, key=lambda t: t["values"][0])["number"] if feasible_done else None
    report.check(
        bool(card) and int(card.group(1) if card else -1) == want,
        f"optuna.{study}.best_card",
        (f"card: trial {card.group(1)} value {card.group(2)}" if card else "no 'Best Trial' card")
        + f"; best feasible complete trial: {want}",
    )
    names = data.get("objective_names") or []
    report.check(
        bool(names) and all(n in text for n in names) and "Objective 0" not in text,
        f"optuna.{study}.objective_name",
        f"objective names {names}: {'shown' if names and all(n in text for n in names) else 'not shown'}"
        + ("; the page says 'Objective 0'" if "Objective 0" in text else ""),
    )
    bad = sorted(t["number"] for t in trials.values() if infeasible(t))
    flagged = sorted(t["number"] for t in trials.values() if marked(t))
    labelled = [n for n in bad if f"trial #{n} (infeasible)" in text]  # the intermediate values plot's legend
    report.check(
        bad == flagged and labelled == bad,
        f"optuna.{study}.infeasible",
        f"infeasible trials {bad} ({[trials[n]['state'] for n in bad]}); with a violated constraint {flagged}; "
        f"labelled '(infeasible)' in the intermediate values legend: {labelled}",
    )
    legend = [w for w in ("Complete", "Pruned", "Fail", "Infeasible") if w in text.split("Timeline", 1)[-1][:600]]
    report.add("NOTE", f"optuna.{study}.timeline", f"timeline legend: {legend}")
    check_progress(study, data, text, report)


def check_progress(study: str, data: dict[str, Any], text: str, report: Report) -> None:
    """Intermediate values against the trials' values, and which trials the intermediate plot draws."""
    trials = data["trials"]
    has_iv = "Intermediate values" in text
    report.check(
        has_iv == bool(data.get("has_intermediate_values")),
        f"optuna.{study}.intermediate_values",
        f"plot shown: {has_iv}; study has intermediate values: {data.get('has_intermediate_values')}",
    )
    finished = [t for t in trials if t["state"] in ("Complete", "Pruned")]
    pairs = [(t["number"], t["state"], (t.get("values") or [math.nan])[0], last_intermediate(t)) for t in finished]
    off = [(n, s, round(v, 4), round(x, 4)) for n, s, v, x in pairs if x is not None and not math.isclose(v, x)]
    valueless = [n for n, _, v, _ in pairs if math.isnan(v)]
    report.check(
        not off and not valueless,
        f"optuna.{study}.intermediate_vs_value",
        f"finished trials whose last intermediate value is not their value (number, state, value, last): "
        f"{off or 'none'}; without a value: {valueless or 'none'}",
    )
    drawn = sorted({int(n) for n in re.findall(r"trial #(\d+)", text.split("Intermediate values", 1)[-1])})
    pruned = [t["number"] for t in trials if t["state"] == "Pruned" and t.get("intermediate_values")]
    report.check(
        set(pruned) <= set(drawn),
        f"optuna.{study}.pruned_drawn",
        f"intermediate values plot draws trials {drawn}; pruned trials with intermediate values: {pruned or 'none'}",
    )


def dashboard_study(page: Any, base: str, summary: dict[str, Any], out: Path, report: Report) -> None:
    sid, study = summary["study_id"], summary["study_name"]
    data = get_json(f"{base}/api/studies/{sid}")
    trials = sorted(data["trials"], key=lambda t: t["number"])
    if open_page(page, f"{base}/dashboard/studies/{sid}", "Timeline", report, f"optuna.{study}.opens"):
        with contextlib.suppress(Exception):  # a study without a finished trial has no card
            page.get_by_text("Best Trial").first.wait_for(timeout=TIMEOUT_MS)
        time.sleep(SETTLE_S)
        shoot(page, out, f"optuna_{study}_history")
        check_history(page, study, data, report)
    check_times(study, trials, report)
    check_attrs(study, data, report)
    if open_page(page, f"{base}/dashboard/studies/{sid}/trials", "Started At", report, f"optuna.{study}.trials"):
        check_states(page, study, trials, report)
    page.set_viewport_size({"width": (page.viewport_size or {}).get("width", 1600), "height": 1700})
    seen: set[str] = set()
    for t in trials:  # one trial detail of each kind worth looking at
        kind = "infeasible" if infeasible(t) else t["state"].lower()
        url = f"{base}/dashboard/studies/{sid}/trials?numbers={t['number']}"
        if kind not in seen and open_page(page, url, "User Attributes", report, f"optuna.{study}.trial"):
            shoot(page, out, f"optuna_{study}_trial{t['number']}_{kind}")
        seen.add(kind)


def dashboard_checks(page: Any, args: argparse.Namespace, report: Report) -> None:
    base = args.dashboard_url.rstrip("/")
    names = [s["study_name"] for s in get_json(f"{base}/api/studies").get("study_summaries", [])]
    if not open_page(page, f"{base}/dashboard/", None, report, "optuna.studies"):
        return
    for n in names:
        page.get_by_text(n).first.wait_for(timeout=TIMEOUT_MS)
    shoot(page, args.out, "optuna_00_studies")
    text = page.inner_text("body")
    report.check(
        bool(names) and all(n in text for n in names),
        "optuna.studies",
        f"{len(names)} studies in the storage: {names}; all listed: {all(n in text for n in names)}",
    )
    for s in get_json(f"{base}/api/studies").get("study_summaries", []):
        dashboard_study(page, base, s, args.out, report)


# ------------------------------------------------------------------------------------------ main


def with_browser(chromium: str, width: int, steps: list[Callable[[Any], None]]) -> None:
    """Run each step on a page of one headless Chromium; a step that raises is reported, the rest run."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--headless=new"])
        try:
            print(f"     chromium {browser.version}", flush=True)
            for step in steps:
                page = browser.new_page(viewport={"width": width, "height": 1000})
                page.set_default_timeout(TIMEOUT_MS)
                try:
                    step(page)
                finally:
                    page.close()
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mlflow-url", default="http://127.0.0.1:5000", help="the running `mlflow ui`")
    ap.add_argument("--dashboard-url", default="http://127.0.0.1:8080", help="the running optuna-dashboard")
    ap.add_argument("--link", required=True, help="the MLflow link the launch printed")
    ap.add_argument("--out", type=Path, default=Path("browser_views"), help="folder for the screenshots")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium executable")
    ap.add_argument("--width", type=int, default=1600, help="the browser window's width in pixels")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    wait_until_up(args.mlflow_url, "mlflow ui")
    wait_until_up(args.dashboard_url.rstrip("/") + "/api/studies", "optuna-dashboard")
    report = Report()

    def guarded(fn: Callable[[Any, argparse.Namespace, Report], None], what: str) -> Callable[[Any], None]:
        def step(page: Any) -> None:
            try:
                fn(page, args, report)
            except Exception as e:
                report.add("FAIL", what, f"stopped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

        return step

    with_browser(args.chromium, args.width, [guarded(mlflow_checks, "mlflow"), guarded(dashboard_checks, "optuna")])
    verdicts = [line.split()[0] for line in report.lines]
    print(
        f"{verdicts.count('PASS')} passed, {report.failed} failed, {verdicts.count('NOTE')} notes; "
        f"screenshots in {args.out}"
    )
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
