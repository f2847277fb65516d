"""Held-out trigger kinds: an exported recipe on backdoors that no study victim had, used as a
user would use it (``bdx-study fit``, then ``bdx-study detect``), written to
docs/heldout_triggers.md.

    bdx-study quickstart                               # the recipe under test (its study never sees these)
    python benchmarks/heldout_triggers.py [--recipe bdx_runs/studies/quickstart/recipe.yaml] [--seeds 0 1]

Five trigger kinds of our own, none of them an attack of the zoo (every zoo attack is a fixed
patch or square, an image or noise blend, a 1-D sinusoid (SIG), a warp, a DCT-domain or
low-frequency perturbation, a bit-depth reduction or a learned, input-specific pattern):

- ``gradient``: a faint global brightness ramp (top-left -0.12 to bottom-right +0.12), added;
- ``cross``: a 5-pixel white plus sign at a random position in every image;
- ``stripes``: diagonal stripes of period 4, blended at opacity 0.25 (a texture);
- ``frame``: a 1-pixel white frame around the image (a shape along the border);
- ``checker_dct``: a 2-D cosine pattern (frequencies 3 and 5 cycles per 16 pixels), +-0.1 (a colour-free
  frequency pattern).

For each kind and seed, a small CNN (the registered ``small_cnn``) is trained here on digits'
1,097 training images with 10% of them poisoned to class 0 (a plain Adam loop, no study, no
augmentation) and saved as safetensors. digits' 700 test images are cut once: the first 450 are
the defender's clean images (``fit --clean``), the other 250 the inputs ``detect`` scores, clean
and triggered (the images whose class is not 0). Each recipe family named (default: the recipe's
default detector, and BaDExpert and TED for comparison when the recipe has them) is fitted on each
model with ``bdx-study fit`` in a subprocess and served with ``bdx-study detect``; the figures come
from detect's output: AUROC (correct-only: clean images the model gets right vs triggered images
that flip to class 0; continuous scores), TPR at the bundle's threshold (the same triggered
images) and FPR on the clean ones, with the realized FPR and 95% interval ``fit`` measured on its
held-out part. Nothing here is searched or tuned: the kinds, rates and models are fixed in this
file, and the recipe comes from a study that never saw any of them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import write_keeping_tail
from safetensors.torch import save_file

from bdx_study.archs import create_model
from bdx_study.data import dataset_info, load_arrays
from bdx_study.metrics import auroc

TARGET = 0
POISON_RATE = 0.1
CLEAN_FOR_FIT = 450  # of digits' 700 test images; the other 250 are scored by detect
KINDS = ("gradient", "cross", "stripes", "frame", "checker_dct")


# ------------------------------------------------------------------------------------ triggers


def apply_trigger(kind: str, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``x`` (N, 1, H, W) in [0, 1] with trigger ``kind``; ``rng`` places random-position shapes."""
    n, _, h, w = x.shape
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = x.copy()
    if kind == "gradient":
        ramp = (yy + xx) / (h + w - 2) * 0.24 - 0.12
        out = out + ramp[None, None]
    elif kind == "cross":
        for i in range(n):
            r, c = rng.integers(1, h - 1), rng.integers(1, w - 1)
            out[i, 0, r, c - 1 : c + 2] = 1.0
            out[i, 0, r - 1 : r + 2, c] = 1.0
    elif kind == "stripes":
        stripes = ((yy + xx) % 4 < 2).astype(np.float32)
        out = 0.75 * out + 0.25 * stripes[None, None]
    elif kind == "frame":
        out[:, :, 0, :] = out[:, :, -1, :] = 1.0
        out[:, :, :, 0] = out[:, :, :, -1] = 1.0
    elif kind == "checker_dct":
        pattern = np.cos(np.pi * 3 * (yy + 0.5) / h) * np.cos(np.pi * 5 * (xx + 0.5) / w) * 0.1
        out = out + pattern[None, None]
    else:
        raise ValueError(f"unknown trigger kind {kind!r}; known: {', '.join(KINDS)}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------ models


def train_model(kind: str, seed: int, train_x: np.ndarray, train_y: np.ndarray, epochs: int) -> torch.nn.Module:
    """A small CNN trained on digits with 10% of the training images triggered and relabelled 0."""
    rng = np.random.default_rng(1000 + seed)
    x, y = train_x.copy(), train_y.copy()
    poisoned = rng.choice(len(x), round(POISON_RATE * len(x)), replace=False)
    x[poisoned] = apply_trigger(kind, x[poisoned], rng)
    y[poisoned] = TARGET
    info = dataset_info("digits")
    torch.manual_seed(seed)
    model = create_model("small_cnn", info.input_shape, info.num_classes, info.mean, info.std)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


# ------------------------------------------------------------------------------------ the CLI, as a user runs it


def bdx(*args: str) -> str:
    """Run ``bdx-study`` as a user would; its output, or SystemExit with it on failure."""
    cmd = [sys.executable, "-m", "bdx_study.cli", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout + p.stderr


def detect(bundle: Path, x: np.ndarray, work: Path, name: str) -> dict[str, Any]:
    inp, out = work / f"{name}.npy", work / f"{name}.json"
    np.save(inp, x)
    bdx("detect", "--detector", str(bundle), "--input", str(inp), "--output", str(out), "--force")
    return dict(json.loads(out.read_text()))


def measure(
    recipe: Path, family: str | None, weights: Path, clean_npz: Path, test: dict[str, np.ndarray], work: Path
) -> dict[str, Any]:
    """fit + detect for one family on one model: the figures of detect's output."""
    bundle = work / f"bundle-{family or 'default'}"
    args = ["fit", "--recipe", str(recipe), "--architecture", "small_cnn", "--num-classes", "10"]
    args += ["--input-shape", "1,16,16", "--weights", str(weights), "--clean", str(clean_npz), "--out", str(bundle)]
    t = time.perf_counter()
    printed = bdx(*args, *(["--detector", family] if family else []), "--force")
    fit_seconds = time.perf_counter() - t
    manifest = json.loads((bundle / "manifest.json").read_text())
    m = manifest["metrics"]
    res_c = detect(bundle, test["clean"], work, "clean")["results"]
    res_t = detect(bundle, test["triggered"], work, "triggered")["results"]
    pred_c = np.array([r["prediction"] for r in res_c])
    pred_t = np.array([r["prediction"] for r in res_t])
    score_c, score_t = np.array([r["score"] for r in res_c]), np.array([r["score"] for r in res_t])
    flag_c, flag_t = np.array([r["flagged"] for r in res_c]), np.array([r["flagged"] for r in res_t])
    correct, success = pred_c == test["clean_y"], pred_t == TARGET
    # per successful triggered input: the members that flag it on their own (a committee), and whether it is flagged
    by = [(r.get("flagged_by"), r["flagged"]) for r, s in zip(res_t, success, strict=True) if s]
    return {
        "detector": manifest["detector"],
        "auroc_correct_only": auroc(score_c[correct], score_t[success]),
        "tpr_at_threshold": float(flag_t[success].mean()) if success.any() else math.nan,
        "fpr_at_threshold": float(flag_c[correct].mean()),
        "fit_fpr": m["fpr_at_threshold_correct_only"],
        "fit_fpr_low": m["fpr_at_threshold_low_correct_only"],
        "fit_fpr_high": m["fpr_at_threshold_high_correct_only"],
        "target_fpr": manifest["target_fpr"],
        "attack_success": float(success.mean()),
        "clean_acc": float(correct.mean()),
        "fit_wall_seconds": fit_seconds,
        "flagged_by": by if by and by[0][0] is not None else None,
        "unchecked_line": next((ln for ln in printed.splitlines() if ln.startswith("unchecked:")), ""),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", type=Path, default=Path("bdx_runs/studies/quickstart/recipe.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--families", nargs="*", default=None, help="default: the recipe's default, badexpert, ted")
    ap.add_argument("--out", type=Path, default=Path("docs/heldout_triggers.md"))
    args = ap.parse_args()
    if not args.recipe.is_file():
        print(f"{args.recipe}: no recipe; run `bdx-study quickstart` first (or pass --recipe)")
        return 2
    import yaml

    recipe = yaml.safe_load(args.recipe.read_text())
    default = recipe["default_detector"]
    families = args.families if args.families is not None else [default, "badexpert", "ted"]
    families = [f for f in dict.fromkeys(families) if f in recipe["detectors"]]
    train, test = load_arrays("digits", None, False)
    train_x, train_y = train.pixels.astype(np.float32), train.labels.astype(np.int64)
    test_x, test_y = test.pixels.astype(np.float32), test.labels.astype(np.int64)
    fit_x, fit_y = test_x[:CLEAN_FOR_FIT], test_y[:CLEAN_FOR_FIT]
    score_x, score_y = test_x[CLEAN_FOR_FIT:], test_y[CLEAN_FOR_FIT:]
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bdx-heldout-") as tmp:
        work = Path(tmp)
        clean_npz = work / "clean.npz"
        np.savez(clean_npz, x=fit_x, y=fit_y)
        for kind in args.kinds:
            for seed in args.seeds:
                t = time.perf_counter()
                model = train_model(kind, seed, train_x, train_y, args.epochs)
                weights = work / f"{kind}-{seed}.safetensors"
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
                rng = np.random.default_rng(2000 + seed)
                keep = score_y != TARGET
                test_inputs = {
                    "clean": score_x,
                    "clean_y": score_y,
                    "triggered": apply_trigger(kind, score_x[keep], rng),
                }
                train_seconds = time.perf_counter() - t
                for family in families:
                    r = measure(args.recipe, family, weights, clean_npz, test_inputs, work)
                    r.update(kind=kind, seed=seed, train_seconds=train_seconds, family=family)
                    rows.append(r)
                    print(
                        f"{kind:12s} seed {seed} {family:10s} clean acc {r['clean_acc']:.3f} "
                        f"ASR {r['attack_success']:.3f} | AUROC {r['auroc_correct_only']:.3f} "
                        f"TPR@thr {r['tpr_at_threshold']:.3f} FPR "
                        f"{r['fpr_at_threshold']:.3f} (fit: {r['fit_fpr']:.3f} [{r['fit_fpr_low']:.3f}, "
                        f"{r['fit_fpr_high']:.3f}])",
                        flush=True,
                    )
    write_report(rows, recipe, default, args, time.perf_counter() - t0)
    return 0


def write_report(rows: list[dict[str, Any]], recipe: dict[str, Any], default: str, args: Any, seconds: float) -> None:
    cmd = "python " + shlex.join(["benchmarks/heldout_triggers.py", *sys.argv[1:]])
    lines = [
        "# Held-out trigger kinds: a recipe on backdoors no study victim had",
        "",
        f"Made by `{cmd}` on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, no GPU), "
        f"{time.strftime('%Y-%m-%d')}, {seconds / 60:.0f} minutes; recipe `{args.recipe}` (study "
        f"{recipe.get('study')}, default detector **{default}**, tuned on attacks "
        f"{', '.join((recipe.get('domain') or {}).get('attacks') or [])}).",
        "",
        "Each model: a small CNN trained here (outside any study) on digits with 10% of its training images "
        "carrying the trigger and relabelled 0. Each detector: the recipe's settings for that family, fitted with "
        "`bdx-study fit` on 450 clean digits test images (20% of them held out by fit to measure the FPR) and "
        "served with `bdx-study detect` on 250 other test images, clean and triggered. Correct-only protocol: "
        "clean images the model classifies correctly against triggered images that flip it to 0; AUROC from "
        "continuous scores. TPR and FPR at the bundle's threshold; `fit FPR` is what fit measured on its held-out "
        "part (95% Clopper-Pearson interval) against the target.",
        "",
        "| kind | seed | model clean acc | ASR | detector | AUROC | TPR at threshold | FPR at threshold (detect) | "
        "fit FPR [95% CI], target | target FPR inside the CI |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        inside = r["fit_fpr_low"] <= r["target_fpr"] <= r["fit_fpr_high"] or r["fit_fpr"] <= r["target_fpr"]
        lines.append(
            f"| {r['kind']} | {r['seed']} | {r['clean_acc']:.3f} | {r['attack_success']:.3f} | "
            f"{r['family']}{' (default)' if r['family'] == default else ''} | {r['auroc_correct_only']:.3f} | "
            f"{r['tpr_at_threshold']:.3f} | {r['fpr_at_threshold']:.3f} | {r['fit_fpr']:.3f} "
            f"[{r['fit_fpr_low']:.3f}, {r['fit_fpr_high']:.3f}], {r['target_fpr']} | {'yes' if inside else 'NO'} |"
        )
    lines += ["", "## Against the targets (the recipe's default detector)", ""]
    mine = [r for r in rows if r["family"] == default]
    for kind in dict.fromkeys(r["kind"] for r in mine):
        rs = [r for r in mine if r["kind"] == kind]
        worst_auc = min(r["auroc_correct_only"] for r in rs)
        worst_tpr = min(r["tpr_at_threshold"] for r in rs)
        ok = worst_auc >= 0.97 and worst_tpr >= 0.90
        lines.append(
            f"- {kind}: worst AUROC {worst_auc:.3f} (target >= 0.97), worst TPR at threshold {worst_tpr:.3f} "
            f"(target >= 0.90): {'met' if ok else '**missed**'}"
        )
    by = [r for r in mine if r["flagged_by"]]
    if by:
        lines += ["", "What flagged the triggered inputs that flip the model (`flagged_by`, all models):", ""]
        counts: dict[str, int] = {}
        total = 0
        for r in by:
            for members, flagged in r["flagged_by"]:
                total += 1
                key = "+".join(members) or ("the pooled score, no member alone" if flagged else "not flagged")
                counts[key] = counts.get(key, 0) + 1
        lines += [f"- {k}: {v} of {total}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
    line = next((r["unchecked_line"] for r in mine if r["unchecked_line"]), "")
    if line:
        lines += ["", f"What `fit` printed about what it cannot check: `{line}`"]
    lines.append("")
    write_keeping_tail(args.out, lines, "## Notes", "## Notes\n\n(what the figures mean: written by hand)\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
