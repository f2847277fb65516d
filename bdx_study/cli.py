"""The ``bdx-study`` command line: the top of the flow.

search_spaces/*.yaml --launch--> trials on Ray (bdx_study.trials) --> MLflow + Parquet
                     --analyze--> robust defaults + recipe (bdx_study.analysis)
                     --export--> detector bundle --detect--> per-input flags

The library modules never import trials or analysis; only this CLI ties them together.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bdx_study._io import disk_full_error, is_disk_full, special_kind
from bdx_study.plugins import load_plugins
from bdx_study.space import SpaceError, StudySpec, builtin_space, load_space


def _space_path(arg: str | None) -> Path:
    return Path(arg) if arg else builtin_space("quickstart")


def _load(arg: str | None) -> tuple[StudySpec, Path]:
    path = _space_path(arg)
    return load_space(path), path


def _probe(address: str) -> None:
    """Is a Ray cluster at --address? Asked before Ray is imported or any data is read."""
    from bdx_study.trials.cluster import probe_address

    probe_address(address)


def cmd_validate(args: argparse.Namespace) -> int:
    from bdx_study.preflight import preflight

    spec, path = _load(args.space)
    if args.address:
        _probe(args.address)
    if not args.file_only:
        preflight(spec, path, local=args.address is None)
    victims = spec.victim_configs()
    families = ", ".join(
        f"{f} ({spec.trials_for(f)} trial(s), searching {', '.join(spec.searched(f)) or 'nothing'})"
        for f in spec.families
    )
    print(f"{path}: OK: study {spec.study.name!r}, {len(victims)} victim(s), {spec.num_trials} trial(s): {families}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Bring MLflow up to date with the study's Parquet tables (after an outage)."""
    spec, _ = _load(args.space)
    from bdx_study.trials.lock import study_lock
    from bdx_study.trials.tracking import StudyTracker, probe_tracking

    ids_path = spec.study_dir / "study.json"
    if not ids_path.is_file():
        raise ValueError(f"{spec.study_dir}: no study there to sync (launch it first)")
    with study_lock(spec.study_dir, spec.study.name, "sync"):  # no launch of it may be running
        ids = json.loads(ids_path.read_text())
        tracker = StudyTracker(ids["tracking_uri"], spec.experiment_name, spec.study.name)
        probe_tracking(tracker.uri)
        tracker.start({"space_file": str(_space_path(args.space))}, parent_run_id=ids.get("parent_run_id"))
        logged = tracker.sync(spec, spec.study_dir)
        tracker.finish(tracker.parent_run_id)
        from bdx_study._io import write_json_atomic

        write_json_atomic(
            ids_path, {**ids, "experiment_id": tracker.experiment_id, "parent_run_id": tracker.parent_run_id}
        )
    if tracker.rebuilt:
        print(
            f"{spec.study.name}: {tracker.uri} held no run of this study (its tracking database was deleted or "
            f"replaced): rebuilt from the tables under a new study run; logged {logged} finished trial(s)"
        )
    else:
        print(f"{spec.study.name}: logged {logged} finished trial(s) MLflow was missing; MLflow matches the tables")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    spec, path = _load(args.space)  # validated before Ray is imported
    if args.address:
        _probe(args.address)
    from bdx_study.trials.launch import launch

    result = launch(spec, source=path, address=args.address, resume=args.resume)
    return 0 if result.num_errors == 0 else 1


def _analyze(spec: StudySpec, quiet: bool = False) -> Path:
    from bdx_study.analysis.analyze import analyze

    result = analyze(spec)
    if not quiet:
        print(result.text)
    return result.recipe


# What analyze and export do to a study whose launch is running (--while-running): the tables are still changing.
_WHILE_RUNNING = {
    "analyze": "analyze the trials finished so far (then analyze again once it ends)",
    "export": "export from the recipe as it is (refused once the tables hold more than it was made from)",
}


def _check_no_launch(spec: StudySpec, command: str, while_running: bool) -> None:
    """Refuse to read a study while a launch of it holds its lock, or (--while-running) warn."""
    from bdx_study.trials.lock import running_launch

    holder = running_launch(spec.study_dir)
    if holder is None:
        return
    running = f"study {spec.study.name!r} at {spec.study_dir} is being run by a bdx-study launch ({holder})"
    if not while_running:
        raise SpaceError(
            f"{running}; its tables are still changing: run `bdx-study {command}` once it finishes (or stop it; "
            f"`launch --resume` continues it), or pass --while-running to {_WHILE_RUNNING[command]}"
        )
    print(f"bdx-study: warning: {running}; --while-running: {_WHILE_RUNNING[command]}", file=sys.stderr, flush=True)


def cmd_analyze(args: argparse.Namespace) -> int:
    spec, _ = _load(args.space)
    _check_no_launch(spec, "analyze", args.while_running)
    _analyze(spec)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    spec, _ = _load(args.space)
    _check_no_launch(spec, "export", args.while_running)
    from bdx_study.analysis.export import export_detector
    from bdx_study.metrics import HEADLINE

    study_dir = spec.study_dir
    default_out = study_dir / (f"detector-{args.detector}" if args.detector else "detector")
    if args.out:  # refused before any work, naming the flag (as fit does)
        from bdx_study.analysis.fit import check_out

        check_out(Path(args.out), args.force)
    bundle, metrics = export_detector(
        spec,
        study_dir,
        Path(args.out) if args.out else default_out,
        detector=args.detector,
        victim=args.victim,
        recipe_path=Path(args.recipe) if args.recipe else None,
        log_to_mlflow=not args.no_mlflow,
        force=args.force or not args.out,  # the default folder is the study's own
    )
    print(f"detector bundle: {bundle}")
    keys = ["threshold", *HEADLINE]
    print("measured on the victim's evaluation split: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in keys))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    """Apply a recipe to the user's own model and clean data; every input is checked first."""
    from bdx_study.analysis.domain import render_warnings
    from bdx_study.analysis.fit import (
        check_out,
        describe_job,
        describe_result,
        parse_input_shape,
        per_channel,
        prepare_fit,
        run_fit,
    )

    load_plugins(args.plugins, flag="--plugins")  # a user's family or architecture
    out = Path(args.out)
    check_out(out, args.force)
    shape = parse_input_shape(args.input_shape)
    job = prepare_fit(
        recipe_path=Path(args.recipe),
        detector=args.detector,
        architecture=args.architecture,
        input_shape=shape,
        num_classes=args.num_classes,
        mean=per_channel(args.mean, shape[0], "--mean"),
        std=per_channel(args.std, shape[0], "--std"),
        weights=Path(args.weights),
        clean=Path(args.clean),
        heldout_fraction=args.heldout_fraction,
        split_seed=args.split_seed,
    )
    if job.domain_warnings:
        print(render_warnings(job.domain_warnings, command="fit") + "\n", file=sys.stderr, flush=True)
    for w in job.data_warnings:
        print(f"bdx-study: warning: fit: {w}\n", file=sys.stderr, flush=True)
    print("\n".join(describe_job(job)), flush=True)
    print(f"fitting {job.family.name} ...", flush=True)
    result = run_fit(job, out, force=args.force)
    print("\n".join(describe_result(job, result)))
    return 0


DETECT_CHUNK = 1024  # inputs scored at a time: memory stays bounded whatever the file holds


def _output_path(out: Path, inputs: Path, bundle: Path, force: bool) -> Path:
    """Where ``detect`` may write: never onto its input or into the bundle; an existing file only
    with --force."""
    resolved = out.resolve()
    if resolved == inputs.resolve():
        raise ValueError(f"--output {out} is the --input file; choose another name")
    if resolved.is_relative_to(bundle.resolve()):
        raise ValueError(f"--output {out} is inside the detector bundle {bundle}; write elsewhere")
    if resolved.is_dir():
        raise ValueError(f"--output {out} is a folder; give a file name ending in .csv or .json")
    kind = special_kind(resolved)
    if kind is not None:  # an atomic write would rename a new file over the node itself
        raise ValueError(
            f"--output {out} is {kind}, which bdx-study never replaces (even with --force); give a regular file name, "
            "or leave out --output to print the results"
        )
    if resolved.exists() and not force:
        raise ValueError(f"--output {out} exists; pass --force to overwrite it")
    return resolved


def cmd_detect(args: argparse.Namespace) -> int:
    import numpy as np

    from bdx_study._io import atomic_path
    from bdx_study.detector import BundleError, Detector, InputError, load_input_array

    load_plugins(args.plugins, flag="--plugins")  # a bundle of a user's family needs its module
    det = Detector.load(args.detector)
    inputs = Path(args.input)
    out = _output_path(Path(args.output), inputs, Path(args.detector), args.force) if args.output else None
    x = load_input_array(inputs)
    if len(x) > DETECT_CHUNK:
        print(
            f"scoring {len(x)} inputs with {det.family.name}, {DETECT_CHUNK} at a time ...", file=sys.stderr, flush=True
        )
    fmt = args.format or (out.suffix.lstrip(".") if out and out.suffix in (".csv", ".json") else "csv")
    # Streamed: each chunk is scored, written and dropped, so memory stays bounded whatever the
    # input's size; a file --output is written under a temporary name and appears whole at the end.
    with contextlib.ExitStack() as stack:
        if out:
            f: Any = stack.enter_context(open(stack.enter_context(atomic_path(out)), "w"))
        else:
            f = sys.stdout
        writer = _DetectWriter(f, fmt, det.family.name, det.threshold)
        for i in range(0, max(len(x), 1), DETECT_CHUNK):
            chunk = np.array(x[i : i + DETECT_CHUNK])
            try:
                records = det.detect(chunk).records()
            except BundleError as e:  # the inputs do not fit the detector: name the file (and where in it)
                where = f" (inputs {i}-{i + len(chunk) - 1})" if len(x) > DETECT_CHUNK else ""
                raise InputError(f"--input {inputs}: {e}{where}") from None
            for j, r in enumerate(records):
                writer.write({**r, "index": i + j})
        writer.close()
    if out:
        print(f"{writer.count} input(s), {writer.flagged} flagged by {det.family.name}; written to {out}")
    return 0


class _DetectWriter:
    """``detect``'s results, one record at a time: CSV (with ``flagged_by`` for a committee: the
    members that flag each input on their own) or one JSON document."""

    def __init__(self, f: Any, fmt: str, detector: str, threshold: float) -> None:
        self.f, self.fmt, self.count, self.flagged = f, fmt, 0, 0
        self.committee: bool | None = None
        if fmt == "json":
            f.write(json.dumps({"detector": detector, "threshold": threshold, "results": []})[:-2] + "\n")

    def write(self, r: dict[str, Any]) -> None:
        if self.committee is None:
            self.committee = "flagged_by" in r
            if self.fmt != "json":
                self.f.write("index,prediction,flagged,score" + (",flagged_by" if self.committee else "") + "\n")
        if self.fmt == "json":
            self.f.write(("" if self.count == 0 else ",\n") + json.dumps(r))
        else:
            row = f"{r['index']},{r['prediction']},{int(r['flagged'])},{r['score']:.6g}"
            self.f.write(row + (f",{'+'.join(r['flagged_by'])}" if self.committee else "") + "\n")
        self.count += 1
        self.flagged += int(r["flagged"])

    def close(self) -> None:
        if self.fmt == "json":
            self.f.write("\n]}\n")
        elif self.committee is None:  # no inputs: the header alone
            self.f.write("index,prediction,flagged,score\n")
        self.f.flush()


def cmd_quickstart(args: argparse.Namespace) -> int:
    """launch (embedded quickstart study) -> analyze -> export -> detect on fresh inputs."""
    import numpy as np

    from bdx_study.analysis.export import pick_victim
    from bdx_study.detector import Detector
    from bdx_study.trials.launch import launch
    from bdx_study.victims import VictimCache

    t0 = time.perf_counter()
    spec, path = _load(args.space)
    # run it again: it resumes, re-running no trial and retraining no victim
    resume = (spec.study_dir / "study.json").exists() or (spec.study_dir / "tune").exists()
    result = launch(spec, source=path, resume=resume)
    print()
    _analyze(spec)
    from bdx_study.analysis.export import export_detector

    study_dir = spec.study_dir
    bundle, _ = export_detector(spec, study_dir, study_dir / "detector", force=True)
    print(f"\ndetector bundle: {bundle}")
    # Use the exported detector as a user would: clean and triggered evaluation inputs as .npy files.
    vcfg = pick_victim(spec, None)
    splits = vcfg.data.splits(vcfg.dataset)
    record = VictimCache(spec.storage_root() / "victims").load(vcfg)
    attack = record.load_attack() if record is not None else vcfg.build_attack()
    clean = splits.evaluation.x.numpy()
    asr = attack.counts_toward_asr(splits.evaluation.y)
    triggered = attack.apply_trigger(splits.evaluation.x[asr]).numpy()
    det = Detector.load(bundle)
    for name, arr, label in (
        ("clean", clean, splits.evaluation.y.numpy()),
        ("triggered", triggered, attack.attack_label(splits.evaluation.y[asr]).numpy()),
    ):
        f = study_dir / f"demo_{name}.npy"
        np.save(f, arr)
        d = det.detect(np.load(f, allow_pickle=False))
        hit = d.prediction == label  # clean: classified correctly; triggered: the attack succeeds
        what = "classified correctly" if name == "clean" else "the backdoor flips to its target"
        goal = f"target FPR {det.manifest['target_fpr']:.0%}" if name == "clean" else "flag them all"
        print(
            f"detect {f.name} ({det.family.name}): {int(d.flagged.sum())}/{len(arr)} flagged; of the {int(hit.sum())} "
            f"{what}, {int(d.flagged[hit].sum())} ({d.flagged[hit].mean():.1%}; {goal})"
        )
    print(
        f"\nquickstart finished in {time.perf_counter() - t0:.0f} s. Try:\n"
        f"  bdx-study detect --detector {bundle} --input {study_dir / 'demo_triggered.npy'} --output flags.csv"
    )
    if result.experiment_id:
        from bdx_study.trials.tracking import runs_link, ui_command

        link = runs_link(result.tracking_uri, result.experiment_id, spec.search.objective.mode, spec.study.name)
        print(f"  {ui_command(result.tracking_uri)}   # then open {link}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from bdx_study.archs import list_architectures
    from bdx_study.attacks import list_attacks
    from bdx_study.data import list_datasets
    from bdx_study.detectors import DETECTORS
    from bdx_study.plugins import load_entry_points
    from bdx_study.protocol import ProtocolConfig

    load_entry_points()  # installed plugins' registrations are listed too
    print("datasets:      " + ", ".join(list_datasets()))
    print("architectures: " + ", ".join(list_architectures()))
    print("attacks:       " + ", ".join(list_attacks()))
    print(f"detectors:     {', '.join(DETECTORS.names())} ({len(DETECTORS.names())} families)")
    print("\nprotocol (shared by every family; `protocol:` in a study file):")
    for name, f in ProtocolConfig.model_fields.items():
        print(f"  {name:24s} default {f.default!r:12s} {f.description}")
    for family in DETECTORS.names():
        cls = DETECTORS.get(family)
        print(f"\ndetector {family} (`detectors: {{{family}: ...}}`): {cls.access}")
        for name, f in cls.Params.model_fields.items():
            comps = [c for c in cls.components if name in cls.Params.component_fields(c)]
            where = f"fit: {'+'.join(comps)}" if comps else "scoring"
            default = "(required)" if f.is_required() else repr(f.default)
            print(f"  {name:24s} default {default:12s} [{where}] {f.description}")
    return 0


def _space_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--space", help="study file (YAML); default: the embedded quickstart study")


def _plugins_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--plugins",
        nargs="+",
        default=[],
        metavar="MODULE",
        help="modules to import first, which register your own detector families or architectures (as a study "
        "file's study.plugins); installed entry points of group bdx_study.plugins load without it",
    )


def _while_running_arg(sp: argparse.ArgumentParser, command: str) -> None:
    sp.add_argument(
        "--while-running",
        action="store_true",
        help=f"while a launch of the study is running: warn and {_WHILE_RUNNING[command]} (default: refuse)",
    )


def _add_launch_and_validate(sub: Any) -> None:
    sp = sub.add_parser("launch", help="run (or --resume) a study on Ray")
    _space_arg(sp)
    sp.add_argument("--address", help="join an existing Ray cluster at HOST:PORT (default: a local Ray)")
    sp.add_argument("--resume", action="store_true", help="continue an interrupted study")
    sp.set_defaults(fn=cmd_launch)

    sp = sub.add_parser("validate", help="check a study file (and its data, storage and resources) and exit")
    _space_arg(sp)
    sp.add_argument("--address", help="the Ray cluster launch will join (checked for an answer; default: this machine)")
    sp.add_argument(
        "--file-only",
        action="store_true",
        help="check the file alone (keys, types, values), not its data, storage or resources: for a study meant for "
        "another machine",
    )
    sp.set_defaults(fn=cmd_validate)


def _add_study_readers(sub: Any) -> None:
    """sync, analyze and export: commands that read a launched study."""
    sp = sub.add_parser("sync", help="log to MLflow what a study's Parquet tables hold and MLflow lacks")
    _space_arg(sp)
    sp.set_defaults(fn=cmd_sync)

    sp = sub.add_parser("analyze", help="pick robust defaults; print them and write recipe.yaml")
    _space_arg(sp)
    _while_running_arg(sp, "analyze")
    sp.set_defaults(fn=cmd_analyze)

    sp = sub.add_parser("export", help="write a detector bundle (a family's robust defaults) for one victim model")
    _space_arg(sp)
    sp.add_argument("--detector", help="detector family (default: the recipe's default_detector)")
    sp.add_argument("--victim", help="victim name or id (default: the first backdoored victim)")
    sp.add_argument("--recipe", help="recipe file (default: the study's recipe.yaml)")
    sp.add_argument("--out", help="bundle folder (default: <study>/detector, or <study>/detector-NAME with --detector)")
    sp.add_argument("--force", action="store_true", help="replace the bundle already in --out (other files stay)")
    sp.add_argument("--no-mlflow", action="store_true", help="do not log the detector to MLflow")
    _while_running_arg(sp, "export")
    sp.set_defaults(fn=cmd_export)


def _add_fit(sub: Any) -> None:
    sp = sub.add_parser(
        "fit",
        help="apply a recipe to your own model and clean data: a detector bundle that `detect` serves",
        description="Fit a recipe's detector family on your model and clean images. A seeded --heldout-fraction "
        "of the images is held out (never fitted or calibrated on) and the realized false-positive rate is "
        "measured on it; the rest is the defender's clean set D_c of the recipe's protocol (scaled down, with a "
        "notice, when you have fewer images). Every input is checked before any work.",
    )
    sp.add_argument("--recipe", required=True, help="recipe.yaml written by `bdx-study analyze`")
    sp.add_argument("--detector", help="detector family of the recipe (default: its default_detector)")
    sp.add_argument("--architecture", required=True, help="registered architecture (`bdx-study list`) of the model")
    sp.add_argument("--num-classes", required=True, type=int, help="classes the model was trained on")
    sp.add_argument("--input-shape", required=True, help="C,H,W the model was trained on, e.g. 3,32,32")
    sp.add_argument(
        "--mean",
        type=float,
        nargs="+",
        help="per-channel normalization mean the model was trained with (one value or C); default: the one saved "
        "in --weights (a bdx-study model holds it)",
    )
    sp.add_argument("--std", type=float, nargs="+", help="per-channel normalization std, as --mean")
    sp.add_argument(
        "--weights",
        required=True,
        help="the model's weights as safetensors (a state_dict: of the bdx-study model, or of the bare network); "
        "pickles (torch.save) are refused",
    )
    _add_fit_data(sp)
    _plugins_arg(sp)
    sp.set_defaults(fn=cmd_fit)


def _add_fit_data(sp: argparse.ArgumentParser) -> None:
    """fit's clean images, its output and its held-out split."""
    sp.add_argument(
        "--clean",
        required=True,
        help="clean images with labels: an .npz with x ((N,C,H,W) or (N,H,W,C), uint8 0-255 or float 0-1) and y "
        "(int labels), read without pickles; or a folder of class folders (named by class index, or all classes "
        "whose sorted names give the class order) of images (png, jpg, bmp, gif, tiff, webp, ppm, pgm), read "
        "with PIL, converted to grayscale (PIL 'L') for C=1 or RGB for C=3 (alpha dropped), resized to H x W "
        "(bilinear, aspect ratio not kept) when their size differs, and scaled to [0, 1]",
    )
    sp.add_argument("--out", required=True, help="bundle folder to write (new or empty; an existing bundle: --force)")
    sp.add_argument("--force", action="store_true", help="replace the bundle already in --out (other files stay)")
    sp.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.2,
        help="share of the clean images held out to measure the realized FPR (default 0.2)",
    )
    sp.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split (default 0)")


def _add_detect_quickstart_list(sub: Any) -> None:
    sp = sub.add_parser("detect", help="flag inputs (.npy, (N, C, H, W) in [0, 1]) with a detector bundle")
    sp.add_argument("--detector", required=True, help="bundle folder")
    sp.add_argument("--input", required=True, help=".npy file of inputs")
    sp.add_argument("--output", help="output file (.csv or .json); default: CSV on stdout")
    sp.add_argument("--format", choices=["csv", "json"])
    sp.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    _plugins_arg(sp)
    sp.set_defaults(fn=cmd_detect)

    sp = sub.add_parser("quickstart", help="launch + analyze + export + detect on the embedded study")
    _space_arg(sp)
    sp.set_defaults(fn=cmd_quickstart)

    sp = sub.add_parser("list", help="registered datasets, architectures, attacks and detector families")
    sp.set_defaults(fn=cmd_list)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per step of the flow (see the module docstring)."""
    p = argparse.ArgumentParser(prog="bdx-study", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    _add_launch_and_validate(sub)
    _add_study_readers(sub)
    _add_fit(sub)
    _add_detect_quickstart_list(sub)
    return p


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM stops a command like Ctrl-C (SIGINT): a launch's Tune run saves its state and
    stops, the MLflow run is closed as KILLED."""
    signal.raise_signal(signal.SIGINT)


def _after_interrupt(args: argparse.Namespace) -> str:
    """What an interrupted command leaves behind and how to go on: true wherever it stopped
    (what it writes appears whole or not at all)."""
    again = f"run `bdx-study {args.command}` again"
    if args.command in ("fit", "export"):
        where = f"--out {args.out}" if args.out else "the study's detector folder"
        return f"no half-written bundle is left in {where} (a bundle appears whole or not at all); {again}"
    if args.command == "detect":
        if not args.output:
            return f"the results printed so far are incomplete; {again}"
        return f"no half-written --output {args.output} is left (it appears whole or not at all); {again}"
    return {
        "launch": "finished trials are kept; `bdx-study launch --resume` continues the study",
        "quickstart": f"finished trials and trained victims are kept; {again} to continue",
        "analyze": f"each file it wrote is whole, but they may mix this run's with the previous run's; {again}",
        "sync": f"what was logged stays logged; {again} for the rest",
    }.get(args.command, "nothing was written")


def _written_places(args: argparse.Namespace) -> dict[str, Path]:
    """Where the command writes (what a full disk is reported against when the error names no file)."""
    places = {f"--{flag}": Path(getattr(args, flag)) for flag in ("out", "output") if getattr(args, flag, None)}
    space = getattr(args, "space", None)
    if space and not places:
        with contextlib.suppress(Exception):  # the study file was read once already; a second failure says nothing new
            places["study storage"] = load_space(space).storage_root()
    return {name: path.parent if name.startswith("--") else path for name, path in places.items()}


def _one_line(e: BaseException) -> str:
    """An error's message on one line; a Ray task's error by its cause (its own text is the
    remote traceback)."""
    cause = getattr(e, "cause", None)
    if type(e).__name__.startswith("RayTaskError") and isinstance(cause, BaseException):
        e = cause
    return " ".join(str(e).split())


def _keep_traceback(e: BaseException) -> str:
    """Where the traceback of an unexpected error was kept (a file, so no one reruns a long
    command to see it)."""
    import tempfile
    import traceback

    try:
        fd, path = tempfile.mkstemp(prefix="bdx-study-error-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("".join(traceback.format_exception(e)))
    except OSError:
        traceback.print_exception(e)
        return "printed above"
    return f"kept in {path}"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        rc: Any = args.fn(args)
    except KeyboardInterrupt:
        print(f"bdx-study: {args.command}: interrupted; {_after_interrupt(args)}", file=sys.stderr)
        return 130
    except Exception as e:
        if is_disk_full(e):  # not bad input: said once, with what each place holds free
            then = _after_interrupt(args)
            full = disk_full_error(e, _written_places(args))
            print(f"bdx-study: {args.command}: {full}; {then} (once there is space)", file=sys.stderr)
            return 1
        if isinstance(e, SpaceError | ValueError | OSError):  # bad input: DataError, BundleError, InputError, ...
            print(f"bdx-study: error: {_one_line(e)}", file=sys.stderr)
            return 2
        if os.environ.get("BDX_STUDY_TRACEBACK"):
            raise
        print(
            f"bdx-study: error: {args.command}: unexpected {type(e).__name__}: {_one_line(e)[:300]} (a bug in "
            f"bdx-study: please report it with the command line and the traceback, {_keep_traceback(e)})",
            file=sys.stderr,
        )
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
