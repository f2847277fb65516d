"""``bdx-study fit``: apply a recipe to a user's own model and clean data.

The flow, with every check before any work:

1. the recipe: a family, its parameters and protocol (the seed policy applied, as ``export``
   does), and its domain (:mod:`bdx_study.analysis.domain`: warnings when the model lies
   outside it);
2. the model: a registered architecture built with the class count, input shape and
   normalization it was trained with, and weights read from a safetensors file (nothing is
   unpickled; weights that do not fit the architecture are refused, naming the mismatches);
3. the clean data: an ``.npz`` (arrays ``x`` and ``y``, read without pickles) or a folder of
   class folders of images; shape, pixel range and labels checked against the model (the
   model and data readers live in :mod:`bdx_study.userfiles`);
4. the split (seeded): a held-out part never used to fit or calibrate, on which the realized
   false-positive rate is measured, and the defender's reserve, from which the recipe's
   protocol takes D_c (its finetune and calibration parts; a clean set larger than the reserve
   is scaled down, with a notice);
5. the fit under the shared protocol (:func:`bdx_study.stages.run_detector`, no cache, the
   attack ``none``: there are no triggered inputs, so only clean figures are measured) and a
   bundle that ``bdx-study detect`` serves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdx_study._io import interrupts_deferred, sha256_file
from bdx_study.archs import Classifier
from bdx_study.attacks import create_attack
from bdx_study.data import DatasetInfo, ImageData, Splits, dataset_info, list_datasets
from bdx_study.detector import BundleError, check_bundle_target, save_bundle
from bdx_study.detectors import DetectorFamily, create_detector
from bdx_study.detectors.committee import MIN_REFERENCE
from bdx_study.metrics import min_calibration
from bdx_study.protocol import Evaluation, ProtocolConfig
from bdx_study.stages import LoadedVictim, StageStore, run_detector
from bdx_study.training import pick_device, predict_proba
from bdx_study.userfiles import Shape, UserFileError, check_classes, load_clean, load_model

from .domain import check_domain, unseen_triggers
from .recipe import Recipe

CHANCE_MARGIN = 0.05  # a model must beat chance on the clean data by this much to be worth a detector


class FitError(UserFileError):
    """Bad input to ``bdx-study fit``; the message names the file or value and what is expected.
    The user's files themselves are read and checked by :mod:`bdx_study.userfiles`."""


# ------------------------------------------------------------------------------------ arguments


def parse_input_shape(text: str) -> Shape:
    """``"C,H,W"`` (or ``CxHxW``) -> (C, H, W), each a positive integer."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise FitError(f"--input-shape {text!r}: expected C,H,W as three positive integers, e.g. 3,32,32")
    return shape  # type: ignore[return-value]


def per_channel(values: Sequence[float] | None, channels: int, flag: str) -> tuple[float, ...] | None:
    """One value per channel (a single value is repeated); None stays None."""
    if values is None:
        return None
    vals = tuple(float(v) for v in values)
    shown = " ".join(map(str, values))
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        either = "1 value" if channels == 1 else f"{channels} values (one per channel) or 1 (used for every channel)"
        raise FitError(
            f"{flag} {shown}: {len(values)} values, but --input-shape has {channels} channel(s): give {either}"
        )
    if not all(math.isfinite(v) for v in vals):
        raise FitError(f"{flag} {shown}: every value must be a finite number")
    if flag == "--std" and min(vals) <= 0:
        raise FitError(f"--std {' '.join(map(str, values))}: every value must be > 0")
    return vals


# ------------------------------------------------------------------------------------ the split


@dataclass(frozen=True)
class SplitPlan:
    """How the user's clean images are used: held out, or the defender's reserve (D_c taken by
    the protocol, possibly scaled down to fit)."""

    total: int
    heldout: int
    protocol: ProtocolConfig  # the recipe's, clean_set_size scaled down when the reserve is smaller
    notice: str | None  # what was scaled, for the user

    @property
    def reserve(self) -> int:
        return self.total - self.heldout

    @property
    def calibration(self) -> int:
        return self.protocol.calibration_images

    @property
    def finetune(self) -> int:
        p = self.protocol
        return p.clean_set_size if p.calibration_size is not None else p.clean_set_size - self.calibration


def _calibration_needed(protocol: ProtocolConfig, share: float = 0.0) -> int:
    """Correctly classified calibration images the threshold needs; a family scored against a
    clean reference (a committee) takes ``share`` of them for that first, at least MIN_REFERENCE."""
    need = min_calibration(protocol.target_fpr) if protocol.threshold_rule == "conformal" else 1
    n = need
    while share > 0 and (n - round(n * share) < need or round(n * share) < MIN_REFERENCE):
        n += 1
    return n


def _fits(protocol: ProtocolConfig, total: int, heldout_fraction: float, share: float = 0.0) -> ProtocolConfig | None:
    """The protocol scaled to ``total`` images, or None when they are too few."""
    heldout = round(total * heldout_fraction)
    reserve = total - heldout
    if heldout < 1 or reserve < 2:
        return None
    if reserve < protocol.reserve_needed:
        protocol = protocol.model_copy(update={"clean_set_size": reserve - (protocol.calibration_size or 0)})
    size, n_cal = protocol.clean_set_size, protocol.calibration_images
    finetune = size if protocol.calibration_size is not None else size - n_cal
    if size < 2 or finetune < 1 or n_cal < _calibration_needed(protocol, share):
        return None
    return protocol


def _fewest_images(protocol: ProtocolConfig, heldout_fraction: float, share: float = 0.0) -> int:
    """The fewest clean images that serve ``protocol`` and a held-out part (doubling, then
    bisection, then a step back over rounding)."""
    hi = 2
    while _fits(protocol, hi, heldout_fraction, share) is None:
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _fits(protocol, mid, heldout_fraction, share) is not None else (mid, hi)
    while hi > 2 and _fits(protocol, hi - 1, heldout_fraction, share) is not None:
        hi -= 1
    return hi


def plan_split(
    total: int, protocol: ProtocolConfig, heldout_fraction: float, source: Path, share: float = 0.0
) -> SplitPlan:
    """Check that ``total`` clean images serve the recipe's protocol and a held-out part (and the
    ``share`` of the calibration images a committee's scales take); the error names the numbers
    and the fewest images that would do."""
    heldout = round(total * heldout_fraction)
    scaled = _fits(protocol, total, heldout_fraction, share)
    if scaled is None:
        reserve = total - heldout
        if protocol.calibration_size is not None:
            cal = f"the recipe's calibration_size {protocol.calibration_size} comes out of them besides D_c"
        else:
            size = max(0, min(protocol.clean_set_size, reserve))
            cal = (
                f"{round(size * protocol.calibration_fraction)} of them would calibrate the threshold "
                f"(calibration_fraction {protocol.calibration_fraction})"
            )
        need = _fewest_images(protocol, heldout_fraction, share)
        why = f" ({share} of them first set the committee's clean scales)" if share else ""
        raise FitError(
            f"--clean {source}: {total} clean images are too few for this recipe: --heldout-fraction "
            f"{heldout_fraction} holds out {heldout}, leaving {reserve} for the defender; {cal}, but its "
            f"{protocol.threshold_rule} threshold at target_fpr {protocol.target_fpr} needs at least "
            f"{_calibration_needed(protocol, share)} calibration images{why} and D_c at least 2. Give at least {need} "
            "clean images"
        )
    notice = None
    if scaled.clean_set_size != protocol.clean_set_size:
        budget = f" + calibration_size {protocol.calibration_size}" if protocol.calibration_size else ""
        notice = (
            f"the recipe's clean_set_size {protocol.clean_set_size}{budget} is more than the {total - heldout} "
            f"images left after holding out {heldout}: using clean_set_size {scaled.clean_set_size}; the "
            f"recipe's figures were measured with {protocol.clean_set_size}"
        )
    return SplitPlan(total, heldout, scaled, notice)


def split_clean(data: ImageData, heldout: int, seed: int) -> tuple[ImageData, ImageData]:
    """(defender's reserve, held-out part) of the user's clean images: a seeded permutation."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.take(order[heldout:]), data.take(order[:heldout])


def augmentation_info(input_shape: Shape, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> DatasetInfo:
    """Facts about the user's data for the finetuning families: the training augmentation of the
    registered dataset with this input shape (digits 16x16: 1 px crop padding; MNIST-like 28x28:
    2 px; CIFAR-10 32x32: 4 px and flips), else H // 8 px crop padding and no flips."""
    like = [dataset_info(n) for n in list_datasets() if tuple(dataset_info(n).input_shape) == tuple(input_shape)]
    pad, flip = (like[0].crop_padding, like[0].horizontal_flip) if like else (max(1, input_shape[1] // 8), False)
    return DatasetInfo("user", tuple(input_shape), num_classes, tuple(mean), tuple(std), pad, flip)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ the fit


@dataclass
class FitJob:
    """Everything ``fit`` checked before any work: what it will fit, on what."""

    recipe_path: Path
    recipe: Recipe
    family: DetectorFamily
    plan: SplitPlan
    model: Classifier
    architecture: str
    info: DatasetInfo
    reserve: ImageData
    heldout: ImageData
    weights: Path
    clean: Path
    split_seed: int
    heldout_fraction: float
    clean_accuracy: float  # of the model on all of the user's clean images
    domain_warnings: list[str] = field(default_factory=list)
    data_warnings: list[str] = field(default_factory=list)  # what the clean images cannot vouch for


def prepare_fit(
    *,
    recipe_path: Path,
    detector: str | None,
    architecture: str,
    input_shape: Shape,
    num_classes: int,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    weights: Path,
    clean: Path,
    heldout_fraction: float = 0.2,
    split_seed: int = 0,
) -> FitJob:
    """Read and check every input of ``fit``; raise :class:`FitError` (a ValueError) on the first
    bad one. Costs one forward pass over the clean images, no fitting."""
    if num_classes < 2:
        raise FitError(f"--num-classes {num_classes}: a classifier has at least 2 classes")
    recipe = Recipe.load(recipe_path)
    family_name, entry = recipe.family(detector)
    params, protocol = entry.config()
    family = create_detector(family_name, params)
    if not 0 < heldout_fraction < 1:
        raise FitError(f"--heldout-fraction {heldout_fraction}: expected a fraction in (0, 1), e.g. 0.2")
    try:  # the library's readers of user files: their refusals are fit's, to a caller catching FitError
        model = load_model(weights, architecture, input_shape, num_classes, mean, std)
        data = load_clean(clean, input_shape, num_classes)
        data_warnings = check_classes(data, num_classes, clean)
    except UserFileError as e:
        raise FitError(str(e)) from None
    plan = plan_split(len(data), protocol, heldout_fraction, clean, family.reference_fraction)
    accuracy = float((predict_proba(model, data.x).argmax(1) == data.y).float().mean())
    _check_learned(accuracy, num_classes, data, model, clean)
    reserve, heldout = split_clean(data, plan.heldout, split_seed)
    _check_calibration(model, reserve, plan, family, clean)
    domain_warnings = check_domain(
        recipe, architecture=architecture, input_shape=input_shape, num_classes=num_classes, detector=family_name
    )
    norm_mean, norm_std = model.get_buffer("mean").flatten().tolist(), model.get_buffer("std").flatten().tolist()
    return FitJob(
        recipe_path=recipe_path,
        recipe=recipe,
        family=family,
        plan=plan,
        model=model,
        architecture=architecture,
        info=augmentation_info(input_shape, num_classes, norm_mean, norm_std),
        reserve=reserve,
        heldout=heldout,
        weights=weights,
        clean=clean,
        split_seed=split_seed,
        heldout_fraction=heldout_fraction,
        clean_accuracy=accuracy,
        domain_warnings=domain_warnings,
        data_warnings=data_warnings,
    )


def _check_calibration(
    model: Classifier, reserve: ImageData, plan: SplitPlan, family: DetectorFamily, clean: Path
) -> None:
    """The threshold is calibrated on the calibration images the model classifies correctly:
    refuse a split that leaves too few of them."""
    _, calibration = plan.protocol.defender_split(reserve)
    correct = int((predict_proba(model, calibration.x).argmax(1) == calibration.y).sum())
    needed = _calibration_needed(plan.protocol, family.reference_fraction)
    if correct < needed:
        raise FitError(
            f"--clean {clean}: the model classifies {correct} of the {len(calibration)} calibration images correctly; "
            f"the threshold at target_fpr {plan.protocol.target_fpr} needs at least {needed} correct ones: give more "
            "clean images"
        )


def _check_learned(accuracy: float, num_classes: int, data: ImageData, model: Classifier, clean: Path) -> None:
    """A model near chance on the user's own clean images does not fit the data as given."""
    chance = 1.0 / num_classes
    if accuracy > chance + CHANCE_MARGIN:
        return
    data_mean = data.x.mean(dim=(0, 2, 3)).tolist()
    model_mean = model.get_buffer("mean").flatten().tolist()
    raise FitError(
        f"--clean {clean}: the model classifies {accuracy:.1%} of the clean images correctly (chance {chance:.1%}): "
        f"the labels (class order), the normalization (mean {' '.join(f'{v:.3g}' for v in model_mean)}, from --mean "
        f"or --weights; the images' own mean is {' '.join(f'{v:.3g}' for v in data_mean)}) or the architecture do not "
        "match the data"
    )


@dataclass
class FitResult:
    bundle: Path
    metrics: dict[str, float]  # on the held-out clean images (evaluation split), plus costs


def check_out(out: Path, force: bool) -> None:
    """Refuse, before any work, an ``--out`` that ``save_bundle`` would refuse."""
    try:
        check_bundle_target(out, force)
    except BundleError as e:
        raise FitError(f"--out {e}") from None


def _check_not_degenerate(evaluation: Evaluation, job: FitJob) -> None:
    """Refuse a detector that cannot flag anything: scores on the clean calibration images that
    are all equal or not numbers, or that saturate (so many of them tie at the highest score that
    the threshold sits there, flagging none of them; a bounded score then flags no input at all)."""
    samples = evaluation.samples
    scores = np.asarray(samples["score"], dtype=np.float64)[np.asarray(samples["split"]) == "calibration"]
    finite = scores[np.isfinite(scores)]
    if len(finite) < len(scores):
        what = f"not all finite numbers ({len(scores) - len(finite)} are not)"
    elif len(finite) and float(np.ptp(finite)) == 0.0:
        what = f"all equal ({finite[0]:.6g})"
    elif len(finite) and evaluation.threshold >= finite.max() and (finite == finite.max()).sum() >= 2:
        top = int((finite == finite.max()).sum())
        what = f"saturated: {top} of them tie at the highest score ({finite.max():.6g}), where the threshold sits"
    else:
        return
    raise FitError(
        f"--recipe {job.recipe_path}: detectors.{job.family.name}: these settings give a detector whose scores on the "
        f"{len(scores)} clean calibration images are {what}: it cannot rank inputs and would flag nothing; check the "
        "recipe's defaults (or fit another family with --detector)"
    )


def run_fit(job: FitJob, out: Path, *, force: bool = False) -> FitResult:
    """Fit the recipe's family on the reserve, calibrate, measure on the held-out part and write
    the bundle."""
    device = pick_device()
    info = job.info
    empty = job.reserve.take(slice(0, 0))
    # No search runs here: the selection split is the held-out part too, and nothing is chosen on it.
    splits = Splits(info, train=empty, reserve=job.reserve, selection=job.heldout, evaluation=job.heldout)
    weights_sha = sha256_file(job.weights)
    run = run_detector(
        StageStore(None),
        job.family,
        job.plan.protocol,
        LoadedVictim(
            weights_sha[:16],
            job.model,
            splits,
            create_attack("none", {}, info.input_shape, info.num_classes, 0),
            {"fit": "user clean data"},
        ),
        device=device,
    )
    _check_not_degenerate(run.evaluation, job)
    metrics = {**run.evaluation.metrics, **run.costs, "heldout_images": float(len(job.heldout))}
    provenance = {**_provenance(job, weights_sha), "stage_keys": run.stage_keys}
    with interrupts_deferred():  # replacing a bundle: all of it or none
        bundle = save_bundle(
            out,
            job.family,
            run.fitted,
            job.model,
            threshold=run.evaluation.threshold,
            target_fpr=job.plan.protocol.target_fpr,
            protocol=job.plan.protocol.model_dump(mode="json"),
            architecture=job.architecture,
            info=info,
            metrics=metrics,
            provenance=provenance,
            reference=run.reference,
            force=force,
        )
    return FitResult(bundle, metrics)


def _provenance(job: FitJob, weights_sha: str) -> dict[str, Any]:
    """Where a fitted bundle comes from: the recipe and its trial, the user's files and how they
    were split, and what the checks said."""
    return {
        "kind": "fit",
        "recipe": str(job.recipe_path),
        "study": job.recipe.study,
        "trial": job.recipe.detectors[job.family.name].chosen_trial,
        "weights": str(job.weights),
        "weights_sha256": weights_sha,
        "clean": str(job.clean),
        "clean_sha256": sha256_file(job.clean) if job.clean.is_file() else None,
        "clean_images": job.plan.total,
        "heldout_images": job.plan.heldout,
        "heldout_fraction": job.heldout_fraction,
        "split_seed": job.split_seed,
        "protocol_notice": job.plan.notice,
        "domain_warnings": job.domain_warnings,
        "data_warnings": job.data_warnings,
        "unchecked": unseen_triggers(job.recipe, job.family.name),
        "metrics_protocol": "held-out part of the user's clean images, never used to fit or calibrate; clean "
        "images only (no triggered inputs): FPR and clean accuracy",
    }


# ------------------------------------------------------------------------------------ reports


def _floats(values: Sequence[float]) -> str:
    return " ".join(f"{v:.4g}" for v in values)


def describe_job(job: FitJob) -> list[str]:
    """What will be fitted, on what: printed before the work starts."""
    p, plan = job.plan.protocol, job.plan
    params = job.family.params.model_dump(mode="json")
    return [
        f"recipe {job.recipe_path} (study {job.recipe.study}): {job.family.name}",
        "  settings: " + ", ".join(f"{k} {v}" for k, v in params.items()),
        f"  protocol: clean_set_size {p.clean_set_size}, calibration {plan.calibration} images, target_fpr "
        f"{p.target_fpr}, threshold_rule {p.threshold_rule}, clean_set_seed {p.clean_set_seed}",
        f"model: {job.architecture}, input {'x'.join(map(str, job.info.input_shape))}, {job.info.num_classes} classes, "
        f"mean {_floats(job.info.mean)}, std {_floats(job.info.std)}; clean accuracy {job.clean_accuracy:.3f} on "
        f"{plan.total} clean images ({job.clean})",
        f"split (seed {job.split_seed}): {plan.heldout} held out (never fitted or calibrated on); of the other "
        f"{plan.reserve}, D_c = {plan.finetune} to fit on + {plan.calibration} to calibrate on"
        + (
            f" ({plan.reserve - p.reserve_needed} unused: a larger --heldout-fraction would measure the FPR on them)"
            if plan.reserve > p.reserve_needed
            else ""
        ),
        *([f"notice: {plan.notice}"] if plan.notice else []),
        unseen_triggers(job.recipe, job.family.name),
    ]


def describe_result(job: FitJob, result: FitResult) -> list[str]:
    m = result.metrics
    target = job.plan.protocol.target_fpr

    def fpr(proto: str) -> str:
        lo, hi = m[f"fpr_at_threshold_low_{proto}"], m[f"fpr_at_threshold_high_{proto}"]
        return f"{m[f'fpr_at_threshold_{proto}']:.3f} (95% CI {lo:.3f}-{hi:.3f})"

    return [
        f"held-out clean images ({len(job.heldout)}, never used to fit or calibrate):",
        f"  realized FPR {fpr('correct_only')} on those the model classifies correctly (what the threshold "
        f"targets), {fpr('all_inputs')} on all; target {target}",
        f"  clean accuracy of the model {m['clean_acc_before']:.3f}, after filtering flagged inputs "
        f"{m['clean_acc_after']:.3f}",
        f"  threshold {m['threshold']:.4g} (flag iff score > threshold); fit {m['fit_seconds']:.1f} s",
        f"detector bundle: {result.bundle}  (serve it: bdx-study detect --detector {result.bundle} --input X.npy)",
    ]
