"""The stage cache: fitted detector components and their outputs, content-addressed, fitted once.

A trial of a sweep differs from earlier ones often only in knobs that never touch fitting
(BaDExpert's ensemble weights, the target FPR). So each fitted *component* of a family (see
:mod:`bdx_study.detectors`) is stored under a key made of everything that changes its fit:

    the victim's key (its model, attack and training data) + the family, its code version and
    the component's name + the component's own parameters and seed + which clean images it
    fits on (``clean_set_size``, ``calibration_fraction``; the split seed is in the victim key)

together with its outputs on the scored inputs (calibration, selection and evaluation parts),
which also depend on how the held-out images are split (the *layout*). The model's own
predictions on those inputs are kept once per victim and layout. Any trial on any node finds
them again; scoring-only knobs then cost tensor arithmetic only.

Layout under ``<storage>/stages/<victim key>/``::

    model/predictions-<key>.safetensors (+ .json)        M's softmax on every scored part
    <family>-<component>-<key>/stage.json                 params, fit metadata, sha256 of the state
    <family>-<component>-<key>/state.safetensors          the fitted tensors (e.g. B's weights)
    <family>-<component>-<key>/outputs-<layout>.safetensors (+ .json: sha256 and scoring cost)

Entries are written atomically and verified by sha256 when loaded; a corrupt entry is fitted
again. A lock per key (``flock``) makes concurrent trials wait for one fit instead of fitting
twice.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bdx_study._io import atomic_dir, atomic_path, file_lock, sha256_file, sha256_json, write_json_atomic
from bdx_study.archs import Classifier
from bdx_study.attacks import Attack
from bdx_study.data import ImageData, Splits
from bdx_study.detectors import PROBE_INPUTS, DetectorFamily, FitContext, Fitted
from bdx_study.protocol import Evaluation, Part, ProtocolConfig, evaluate, scoring_parts
from bdx_study.training import predict_proba

# ------------------------------------------------------------------------------------ cost


@dataclass
class Cost:
    """Work done to compute outputs: victim-architecture forward and backward passes (counted per
    input sample), wall seconds, and how many inputs were scored."""

    forward: float = 0.0
    backward: float = 0.0
    seconds: float = 0.0
    inputs: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"forward": self.forward, "backward": self.backward, "seconds": self.seconds, "inputs": self.inputs}


@contextlib.contextmanager
def count_passes() -> Iterator[Cost]:
    """Count, while the block runs in this process, the samples that go forward (and backward)
    through any :class:`~bdx_study.archs.Classifier` (the victim and its copies: B, M', scaled
    or pruned variants); the block's wall time lands in ``seconds``."""
    cost = Cost()

    def on_backward(n: int) -> Any:
        def hook(grad: Tensor) -> None:
            cost.backward += n

        return hook

    def on_forward(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, Classifier) and args and isinstance(args[0], Tensor):
            n = int(args[0].shape[0])
            cost.forward += n
            if isinstance(output, Tensor) and output.requires_grad:
                output.register_hook(on_backward(n))

    handle = torch.nn.modules.module.register_module_forward_hook(on_forward)
    start = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds += time.perf_counter() - start
        handle.remove()


# ------------------------------------------------------------------------------------ the store


@dataclass
class ComponentRun:
    """One component of a family on one victim: its key, state and outputs per scored part."""

    key: str
    fitted: Fitted
    outputs: dict[str, dict[str, Tensor]]  # part name -> feature name -> (N, ...) tensor
    fitted_now: bool
    fit_seconds: float  # of the fit that produced the state (now or when it was cached)
    cost: Cost  # of computing the outputs


def _safetensors_name(part: str, feature: str) -> str:
    return f"{part}::{feature}"


class StageStore:
    """Fitted components and outputs under ``root`` (``<storage>/stages``); ``root=None`` keeps
    nothing (every call fits again: the behaviour without a stage cache)."""

    MEMORY_ENTRIES = 64  # recently used entries kept in memory (trial actors are reused)

    def __init__(self, root: str | Path | None) -> None:
        self.root = None if root is None else Path(root)
        self._memory: OrderedDict[str, Any] = OrderedDict()
        self.fits = 0  # components fitted by this process through this store

    # -- keys ----------------------------------------------------------------------------------

    @staticmethod
    def component_key(family: DetectorFamily, component: str, victim_key: str, protocol: ProtocolConfig) -> str:
        return sha256_json(
            {
                "victim": victim_key,
                "family": family.name,
                "version": family.version,
                "component": component,
                "params": family.params.component_params(component),
                "clean_set": protocol.clean_set_identity(),
            }
        )[:20]

    @staticmethod
    def layout_key(layout: dict[str, Any], protocol: ProtocolConfig) -> str:
        return sha256_json({"layout": layout, "clean_set": protocol.clean_set_identity()})[:16]

    # -- memory --------------------------------------------------------------------------------

    def _remember(self, key: str, value: Any) -> Any:
        if self.root is not None:
            self._memory[key] = value
            self._memory.move_to_end(key)
            while len(self._memory) > self.MEMORY_ENTRIES:
                self._memory.popitem(last=False)
        return value

    def _recall(self, key: str) -> Any:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        return None

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        if self.root is None:
            yield
        else:
            with file_lock(self.root / ".locks" / f"{key}.lock"):
                yield

    # -- the model's predictions ---------------------------------------------------------------

    def predictions(
        self,
        victim_key: str,
        layout: dict[str, Any],
        protocol: ProtocolConfig,
        model: nn.Module,
        parts: list[Part],
        device: torch.device,
    ) -> tuple[dict[str, Tensor], Cost]:
        """M's softmax probabilities on every part (computed once per victim and layout)."""
        lk = self.layout_key(layout, protocol)
        folder = None if self.root is None else self.root / victim_key / "model"
        mem = f"{victim_key}/model/{lk}"
        got = self._recall(mem)
        if got is None:
            with self._locked(f"{victim_key}-model-{lk}"):
                got = self._load_outputs(folder, f"predictions-{lk}", parts)
                if got is None:
                    with count_passes() as cost:
                        probs = {p.name: {"probs": predict_proba(model, p.x, device=device)} for p in parts}
                    cost.inputs = sum(len(p) for p in parts)
                    got = (probs, cost)
                    self._save_outputs(folder, f"predictions-{lk}", probs, cost)
            self._remember(mem, got)
        outputs, cost = got
        return {name: o["probs"] for name, o in outputs.items()}, cost

    # -- components ----------------------------------------------------------------------------

    def component(
        self,
        family: DetectorFamily,
        component: str,
        *,
        victim_key: str,
        layout: dict[str, Any],
        protocol: ProtocolConfig,
        ctx: FitContext,
        parts: list[Part],
        preds: dict[str, Tensor],
    ) -> ComponentRun:
        """The fitted ``component`` and its outputs on ``parts``: from the cache, or fitted and
        computed now (and stored)."""
        key = self.component_key(family, component, victim_key, protocol)
        lk = self.layout_key(layout, protocol)
        folder = None if self.root is None else self.root / victim_key / f"{family.name}-{component}-{key}"
        mem = f"{key}/{lk}"
        got = self._recall(mem)
        if got is not None:
            fitted, outputs, cost, fit_seconds = got
            return ComponentRun(key, fitted, outputs, False, fit_seconds, cost)
        with self._locked(key):
            loaded = self._load_state(folder)
            fitted_now = loaded is None
            if loaded is None:
                start = time.perf_counter()
                fitted = family.fit(component, ctx)
                fit_seconds = time.perf_counter() - start
                self.fits += 1
                self._save_state(folder, key, family, component, protocol, fitted, fit_seconds)
            else:
                fitted, fit_seconds = loaded
            got_outputs = self._load_outputs(folder, f"outputs-{lk}", parts)
            if got_outputs is None:
                with count_passes() as cost:
                    outputs = {
                        p.name: family.features(component, fitted, ctx.model, p.x, preds[p.name], ctx.device)
                        for p in parts
                    }
                cost.inputs = sum(len(p) for p in parts)
                self._save_outputs(folder, f"outputs-{lk}", outputs, cost)
            else:
                outputs, cost = got_outputs
        self._remember(mem, (fitted, outputs, cost, fit_seconds))
        return ComponentRun(key, fitted, outputs, fitted_now, fit_seconds, cost)

    # -- files ---------------------------------------------------------------------------------

    @staticmethod
    def _load_state(folder: Path | None) -> tuple[Fitted, float] | None:
        if folder is None or not (folder / "stage.json").is_file():
            return None
        try:
            meta = json.loads((folder / "stage.json").read_text())
            state = folder / "state.safetensors"
            if sha256_file(state) != meta["sha256"]:
                raise ValueError("sha256 mismatch")
            return Fitted(load_file(state), meta["meta"]), float(meta["fit_seconds"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"[bdx-study] stage cache entry {folder} is corrupt ({e}); fitting it again", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            return None

    @staticmethod
    def _save_state(
        folder: Path | None,
        key: str,
        family: DetectorFamily,
        component: str,
        protocol: ProtocolConfig,
        fitted: Fitted,
        fit_seconds: float,
    ) -> None:
        if folder is None:
            return
        with atomic_dir(folder) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in fitted.tensors.items()}, tmp / "state.safetensors")
            info = {
                "key": key,
                "family": family.name,
                "version": family.version,
                "component": component,
                "params": family.params.component_params(component),
                "clean_set": protocol.clean_set_identity(),
                "meta": fitted.meta,
                "fit_seconds": fit_seconds,
                "sha256": sha256_file(tmp / "state.safetensors"),
            }
            (tmp / "stage.json").write_text(json.dumps(info, indent=2))

    @staticmethod
    def _load_outputs(
        folder: Path | None, stem: str, parts: list[Part]
    ) -> tuple[dict[str, dict[str, Tensor]], Cost] | None:
        if folder is None or not (folder / f"{stem}.json").is_file():
            return None
        path = folder / f"{stem}.safetensors"
        try:
            meta = json.loads((folder / f"{stem}.json").read_text())
            if sha256_file(path) != meta["sha256"]:
                raise ValueError("sha256 mismatch")
            flat = load_file(path)
            outputs: dict[str, dict[str, Tensor]] = {p.name: {} for p in parts}
            for name, t in flat.items():
                part, _, feature = name.partition("::")
                outputs[part][feature] = t
            for p in parts:
                if any(t.shape[0] != len(p) for t in outputs[p.name].values()) or not outputs[p.name]:
                    raise ValueError(f"outputs of {p.name} do not match its {len(p)} inputs")
            return outputs, Cost(**meta["cost"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"[bdx-study] stage cache outputs {path} are unusable ({e}); computing them again", flush=True)
            return None

    @staticmethod
    def _save_outputs(folder: Path | None, stem: str, outputs: dict[str, dict[str, Tensor]], cost: Cost) -> None:
        if folder is None:
            return
        flat = {_safetensors_name(p, f): t.contiguous() for p, feats in outputs.items() for f, t in feats.items()}
        path = folder / f"{stem}.safetensors"
        with atomic_path(path) as tmp:
            save_file(flat, tmp)
        write_json_atomic(folder / f"{stem}.json", {"sha256": sha256_file(path), "cost": cost.as_dict()})


# ------------------------------------------------------------------------------------ one run


@dataclass
class DetectorRun:
    """A family evaluated on one victim: the evaluation, its components and what it cost."""

    evaluation: Evaluation
    components: dict[str, ComponentRun]
    costs: dict[str, float] = field(default_factory=dict)  # the cost metrics of bdx_study.metrics

    @property
    def fitted_now(self) -> int:
        return sum(c.fitted_now for c in self.components.values())

    @property
    def stage_keys(self) -> dict[str, str]:
        return {name: c.key for name, c in self.components.items()}

    @property
    def fitted(self) -> dict[str, Fitted]:
        return {name: c.fitted for name, c in self.components.items()}

    @property
    def reference(self) -> Fitted | None:
        """The clean reference the score was put on its scale with (a committee's), else None."""
        return self.evaluation.reference


@dataclass(frozen=True)
class LoadedVictim:
    """A victim as a detector runs on it: what :func:`run_detector` needs of it, loaded."""

    key: str  # the victim's key (its model, attack and training data): the stage cache's folder
    model: nn.Module  # M, taking [0, 1] pixels
    splits: Splits  # the study's disjoint splits of the victim's dataset
    attack: Attack  # the attack as trained (triggers the scored inputs)
    layout: dict[str, Any]  # how the held-out images were split (DataConfig.layout): part of every output key


def run_detector(
    store: StageStore,
    family: DetectorFamily,
    protocol: ProtocolConfig,
    victim: LoadedVictim,
    *,
    device: torch.device,
    parts: list[Part] | None = None,
) -> DetectorRun:
    """Fit (or find) every component of ``family`` on ``victim``'s defender data, score every
    part (default: :func:`~bdx_study.protocol.scoring_parts` of the victim under ``protocol``)
    and evaluate it under the shared protocol."""
    splits, victim_key, layout = victim.splits, victim.key, victim.layout
    parts = parts if parts is not None else scoring_parts(splits, victim.attack, protocol)
    model = victim.model.to(device).eval()
    probs, base_cost = store.predictions(victim_key, layout, protocol, model, parts, device)
    preds = {name: p.argmax(1) for name, p in probs.items()}
    finetune, calibration = protocol.defender_split(splits.reserve)
    by_name = {p.name: p for p in parts}
    sel_clean, sel_trig = by_name["selection/clean"], by_name["selection/triggered"]
    k = PROBE_INPUTS  # the first inputs of each selection part: a random sample (the split is permuted)
    probe = (ImageData(sel_clean.x[:k], sel_clean.label[:k]), ImageData(sel_trig.x[:k], sel_trig.attack_label[:k]))
    ctx = FitContext(model=model, clean=finetune, holdout=calibration, info=splits.info, device=device, probe=probe)
    runs: dict[str, ComponentRun] = {}
    prefixes: dict[str, str] = {}
    for c in family.fitted_components():
        owner, component, prefixes[c] = family.stage_of(c)  # a committee's member fits and caches its own
        runs[c] = store.component(
            owner, component, victim_key=victim_key, layout=layout, protocol=protocol, ctx=ctx, parts=parts, preds=preds
        )
    feats = {p.name: {prefixes[c] + k: v for c, r in runs.items() for k, v in r.outputs[p.name].items()} for p in parts}
    ev = evaluate(family, parts, preds, feats, protocol)
    n = max(1, sum(len(p) for p in parts))
    costs = [base_cost, *(r.cost for r in runs.values())]  # each measured when its outputs were computed
    # Served, components that read M's activations get them from M's own forward (Detector.detect,
    # model_pass): the cache computed that forward twice (M's predictions, the component's outputs);
    # the cost of the detector counts it once.
    shared = any(family.stage_of(c)[0].uses_activations for c in runs)
    forward = sum(c.forward for c in costs) - (base_cost.forward if shared else 0.0)
    seconds = sum(c.seconds for c in costs) - (base_cost.seconds if shared else 0.0)
    return DetectorRun(
        ev,
        runs,
        {
            "forward_passes_per_input": forward / n,
            "backward_passes_per_input": sum(c.backward for c in costs) / n,
            "score_seconds_per_input": seconds / n,
            "fit_seconds": sum(r.fit_seconds for r in runs.values()),
        },
    )
