"""Benchmark of the victim zoo: every registered attack trained on Fashion-MNIST with the small
CNN on the CPU, written to docs/victims.md.

    python benchmarks/victims.py [--train-size N] [--epochs E] [--attacks a,b,...] [--out FILE]

For each attack (default params, i.e. its reference rates for 28x28 inputs) one victim is
trained with the same recipe as a clean victim (attack ``none``): Adam lr 1e-3 (x0.1 for the
last epoch, so that final accuracies are not one noisy Adam step), batch 128, crop
augmentation, seed 0. The table gives clean accuracy on the whole 10,000-image test
portion, its drop against the clean victim, attack success on the inputs that count toward it
(all-to-one: true class != target; TaCT: the source class; all-to-all: every input, success =
(y + 1) mod C), the poison and cover rates used, and the wall time of poisoning + training.
Target: attack success >= 85% with a drop of at most 2 points.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _report import write_keeping_tail

from bdx_study.attacks import ATTACKS, ArtifactStore, list_attacks
from bdx_study.victims import AttackSpec, DataConfig, TrainingConfig, VictimConfig, train_victim

ASR_TARGET, DROP_TARGET = 0.85, 0.02


def victim(attack: str, params: dict[str, Any], args: argparse.Namespace) -> VictimConfig:
    return VictimConfig(
        dataset="fashion_mnist",
        architecture="small_cnn",
        attack=AttackSpec(name=attack, params=params),
        seed=args.seed,
        training=TrainingConfig(
            optimizer="adam", lr=1e-3, epochs=args.epochs, milestones=tuple(args.milestones), batch_size=128
        ),
        data=DataConfig(train_size=args.train_size, reserve_size=1000),
    )


def row(name: str, m: dict[str, float], clean_acc: float, controls: bool) -> str:
    drop = clean_acc - m["clean_acc"]
    asr = m["attack_success"]
    if name == "none":
        verdict, asr_s = "reference", "-"
    else:
        ok = asr >= ASR_TARGET and drop <= DROP_TARGET
        misses = [f"ASR {asr:.1%} < 85%"] * (asr < ASR_TARGET) + [f"drop {drop * 100:.1f} pts > 2"] * (
            drop > DROP_TARGET
        )
        verdict, asr_s = ("yes" if ok else "**no**: " + "; ".join(misses)), f"{asr:.1%}"
    unit = " per batch" if controls else ""
    rates = f"{m['poison_rate']:g} / {m['cover_rate']:g}{unit}"
    counts = "-" if controls else f"{int(m['poisoned_count'])} / {int(m['cover_count'])}"
    return (
        f"| {name} | {m['clean_acc']:.1%} | {drop * 100:+.1f} | {asr_s} | {rates} | {counts} | "
        f"{m['train_seconds']:.0f} | {verdict} |"
    )


def recipe_notes(names: list[str]) -> list[str]:
    """Each attack's one-line summary and its 'Adaptation' paragraph, from its docstring."""
    out = ["", "## The attacks and their adaptation to 28x28", ""]
    for name in names:
        if name == "none":
            continue
        doc = " ".join((ATTACKS.get(name).__doc__ or "").split())
        summary = doc.split(". ")[0].rstrip(".") + "."
        at = doc.find("Adaptation")
        adaptation = doc[at:] if at >= 0 else ""
        out.append(f"- **{name}**: {summary} {adaptation}".rstrip())
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-size", type=int, default=20000, help="training images (of 60,000)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--milestones", type=int, nargs="*", default=[5], help="epochs at which lr x0.1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attacks", default=None, help="comma-separated subset (default: every registered attack)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--artifacts", type=Path, default=None, help="attack artifact store (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=Path("docs/victims.md"))
    ap.add_argument(
        "--results",
        type=Path,
        default=Path("bdx_runs/bench-victims"),
        help="per-victim results, keyed by the victim key: a row whose attack, defaults and recipe are unchanged "
        "is reused instead of retrained (--rerun retrains all)",
    )
    ap.add_argument("--rerun", action="store_true")
    return ap.parse_args()


Results = dict[str, tuple[dict[str, float], bool]]  # attack -> (metrics, controls training)


def train_all(names: list[str], args: argparse.Namespace) -> tuple[Results, int]:
    """Each attack's victim trained (or its saved result reused): (results, how many reused)."""
    store = ArtifactStore(args.artifacts or Path(tempfile.mkdtemp(prefix="bdx-zoo-artifacts-")))
    results: Results = {}
    reused = 0
    args.results.mkdir(parents=True, exist_ok=True)
    for name in names:
        cfg = victim(name, {}, args)
        saved = args.results / f"{name}-{cfg.key}.json"
        if saved.is_file() and not args.rerun:
            record = json.loads(saved.read_text())
            metrics, controls = record["metrics"], record["controls_training"]
            reused += 1
        else:
            _, metrics, attack = train_victim(cfg, device=torch.device("cpu"), artifacts=store)
            controls = attack.controls_training
            record = {"config": cfg.model_dump(mode="json"), "metrics": metrics, "controls_training": controls}
            saved.write_text(json.dumps(record, indent=2))
        results[name] = (metrics, controls)
        print(
            f"{name:16s} clean {metrics['clean_acc']:.4f}  ASR {metrics['attack_success']:.4f}  "
            f"rates {metrics['poison_rate']:g}/{metrics['cover_rate']:g}  {metrics['train_seconds']:.0f} s",
            flush=True,
        )
    return results, reused


def report(results: Results, reused: int, wall: float, args: argparse.Namespace) -> list[str]:
    command = "python benchmarks/victims.py " + shlex.join(sys.argv[1:])
    machine = (
        f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, CPU only"
    )
    clean_acc = results["none"][0]["clean_acc"]
    training = sum(m["train_seconds"] for m, _ in results.values()) / 60
    from_earlier = (
        f" ({reused} of {len(results)} rows reused from an earlier run of this command: unchanged victim keys; "
        f"this run {wall / 60:.0f} min)."
    )
    return [
        "# Victim zoo on Fashion-MNIST",
        "",
        "Every registered attack at its default parameters for 28x28 inputs (the reference rates in each",
        "attack's docstring), one victim each: small CNN, Adam lr 1e-3 (x0.1 at epochs "
        f"{', '.join(map(str, args.milestones)) or '-'}), batch 128, random-crop",
        f"augmentation, {args.epochs} epochs on {args.train_size:,} of the 60,000 training images, seed {args.seed}.",
        "Clean accuracy is on the whole 10,000-image test portion; the drop is against the clean victim",
        "(`none`) trained the same way; attack success (ASR) counts triggered test inputs of classes other",
        "than the target (TaCT: the source class; all-to-all: every input, success = (y + 1) mod 10).",
        "Rates are fractions of the training set (training-controlled attacks: of every batch); counts are",
        "poisoned / cover images in the fixed poisoned set. Time: poisoning (incl. any surrogate or encoder",
        "the attack trains) + training + evaluation, seconds. Target: ASR >= 85% with a drop <= 2 points.",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"Training time of the rows: {training:.0f} min" + (from_earlier if reused else "."),
        "",
        "| attack | clean acc | drop (pts) | ASR | poison / cover rate | poisoned / cover | time (s) | meets target |",
        "|---|---|---|---|---|---|---|---|",
        *[row(n, m, clean_acc, c) for n, (m, c) in results.items()],
        *recipe_notes(list(results)),
    ]


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.attacks.split(",") if args.attacks else list_attacks()
    names = ["none", *[n for n in names if n != "none"]]
    start = time.perf_counter()
    results, reused = train_all(names, args)
    wall = time.perf_counter() - start
    write_keeping_tail(args.out, report(results, reused, wall, args), "## Notes")  # the notes are written by hand
    print(f"wrote {args.out} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
