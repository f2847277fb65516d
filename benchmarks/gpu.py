"""GPU benchmark of bdx-study's training paths (ResNet-18 on CIFAR-shaped data), and what they
make of the shipped ablation study.

    python benchmarks/gpu.py [all|epoch|pack|project]      # on a machine with CUDA
    SMOKE=1 DEV=cpu python benchmarks/gpu.py                # a tiny CPU run of every stage
    OUT=folder ...                                          # the figures also go to folder/gpu.json

Without CUDA (and without DEV=cpu) it says that it needs CUDA and exits 0. It needs torch,
pydantic, PyYAML and safetensors only: no Ray, MLflow or Optuna (a GPU machine may lack them;
the projection reads the study through ``bdx_study.space``, which imports none of them).

The data: CIFAR-shaped uint8 images (50,000 train + 10,000 test, 10 classes: a random colour
template per class plus noise, so it is learnable) synthesized in memory and written in CIFAR-10's
binary format to a temporary data root, then read by the real ``cifar10`` loader. Nothing is
downloaded. The recipe (architecture, optimizer, lr, batch size, epochs, victims, the detector
grid) is read from search_spaces/ablation.yaml.

1. **epoch**: one epoch of the project's loop (``training.fit``: the victims' and BaDExpert's)
   against a bare GPU-resident loop doing the same work (per-sample random crop and flip, drawn
   on the device; no hooks, no CPU generator), each after a warm-up epoch, in fp32 and in
   bf16 + channels_last. Target: project / bare <= 1.15.
2. **victims**: the ablation's victim training, per epoch x epochs x victims, in both precisions.
3. **pack**: BaDExpert fits (backdoor expert + auxiliary model at the study's reference values:
   |D_c| 2,000, 1 unlearning epoch, 10 auxiliary epochs; early stopping off, so every fit runs
   its full length) at 1, 2, 4 and 8 concurrent processes on the GPU, each process with 2 torch
   threads; fits per minute and that throughput relative to one process. Target: 4 processes
   >= 2.5x one.
4. **project**: the ablation's GPU-hours: victims (2.) plus fits, with and without the stage
   cache. The distinct fits per victim come from the study's own grid and the library's stage
   keys (``StageStore.component_key``); each fit's time is the measured reference fit (3.)
   scaled by its finetune images x epochs (a linear model; early stopping would only shorten
   fits; scoring is left out). Target: <= 1 GPU-hour.

Prints the figures; nothing is asserted.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing it
    sys.path.insert(0, str(REPO))

from bdx_study._io import write_json_atomic  # noqa: E402

ABLATION = REPO / "search_spaces" / "ablation.yaml"
SMOKE = bool(os.environ.get("SMOKE"))
DEV = torch.device(os.environ.get("DEV", "cuda"))
PACK_THREADS = 2  # torch threads per packed process
PACKING = (1, 2) if SMOKE else (1, 2, 4, 8)
REFERENCE = {"clean_set_size": 200 if SMOKE else 2000, "unlearn_epochs": 1, "aux_epochs": 2 if SMOKE else 10}
FIGURES: dict[str, Any] = {}


def log(key: str, value: Any) -> None:
    FIGURES[key] = value
    print(f"{key}: {json.dumps(value)}", flush=True)
    if os.environ.get("OUT"):
        write_json_atomic(Path(os.environ["OUT"]) / "gpu.json", FIGURES)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ data and recipe


def write_cifar_root(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """CIFAR-shaped uint8 data in CIFAR-10's binary format (records of 1 label byte + 3,072
    CHW pixel bytes) under ``root/cifar-10-batches-bin``: a random colour template per class
    plus uniform noise."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(40, 216, size=(10, 3, 32, 32)).astype(np.int16)
    n = n_train + n_test
    y = rng.integers(0, 10, size=n).astype(np.uint8)
    x = (templates[y] + rng.integers(-40, 41, size=(n, 3, 32, 32))).clip(0, 255).astype(np.uint8)
    rec = np.concatenate([y[:, None], x.reshape(n, -1)], axis=1)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(rec[:n_train], 5)):
        part.tofile(folder / f"data_batch_{i + 1}.bin")
    rec[n_train:].tofile(folder / "test_batch.bin")
    return root


def study() -> Any:
    from bdx_study.space import load_space

    return load_space(ABLATION)


def victim_config(spec: Any, root: Path) -> Any:
    """The ablation's first victim, its data read from ``root`` (tiny under SMOKE)."""
    cfg = spec.victim_configs()[0]
    data = cfg.data.model_copy(update={"root": str(root), "download": False})
    update: dict[str, Any] = {"data": data}
    if SMOKE:
        update["data"] = data.model_copy(update={"reserve_size": 300, "train_size": 512})
        update["architecture"] = "small_cnn"
    return cfg.model_copy(update=update)


def optimizer(net: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    t = cfg.training
    if t.optimizer == "adam":
        return torch.optim.Adam(net.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(net.parameters(), lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)


# ------------------------------------------------------------------------------ 1. epoch times


def project_epochs(cfg: Any, data: Any, info: Any, precision: str, channels_last: bool) -> tuple[float, Any]:
    """Seconds of the timed epoch of ``training.fit`` (after a warm-up epoch); the net."""
    from bdx_study.training import fit

    torch.manual_seed(cfg.seed)
    net = cfg.build_model().to(DEV)
    opt = optimizer(net, cfg)
    kw = {"batch_size": cfg.training.batch_size, "augment": info, "device": DEV}
    kw.update(precision=precision, channels_last=channels_last)
    fit(net, data, opt, epochs=1, gen=torch.Generator().manual_seed(0), **kw)
    sync()
    t = time.perf_counter()
    fit(net, data, opt, epochs=1, gen=torch.Generator().manual_seed(1), **kw)
    sync()
    return time.perf_counter() - t, net


def bare_epoch(cfg: Any, data: Any, info: Any, precision: str, channels_last: bool) -> float:
    """The same epoch as a bare loop: data, permutation and augmentation draws all on the device."""
    torch.manual_seed(cfg.seed)
    net = cfg.build_model().to(DEV)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=layout)
    opt = optimizer(net, cfg)
    loss_fn = torch.nn.CrossEntropyLoss()
    xs, ys = data.pixels.to(DEV), data.y.to(DEV)
    n, (c, h, w), p, bs = len(ys), data.shape, info.crop_padding, cfg.training.batch_size
    ar_h, ar_w = torch.arange(h, device=DEV), torch.arange(w, device=DEV)

    def one() -> None:
        perm = torch.randperm(n, device=DEV)
        for s in range(0, n, bs):
            i = perm[s : s + bs]
            x = xs[i].float().div_(255.0)
            k = len(i)
            xp = torch.nn.functional.pad(x, (p, p, p, p))
            dy, dx = torch.randint(0, 2 * p + 1, (2, k), device=DEV)
            rows, cols = dy[:, None] + ar_h, dx[:, None] + ar_w
            n_idx = torch.arange(k, device=DEV)[:, None, None, None]
            c_idx = torch.arange(c, device=DEV)[None, :, None, None]
            x = xp[n_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]
            x = torch.where((torch.rand(k, device=DEV) < 0.5)[:, None, None, None], x.flip(-1), x)
            x = x.contiguous(memory_format=layout)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_fn(net(x), ys[i])
            loss.backward()
            opt.step()

    one()
    sync()
    t = time.perf_counter()
    one()
    sync()
    return time.perf_counter() - t


def stage_epoch(cfg: Any, work: Path) -> dict[str, float]:
    """Epoch times (project vs bare) in both precisions; saves the fp32 net as the packing victim."""
    from safetensors.torch import save_file

    splits = cfg.data.splits(cfg.dataset)
    data = cfg.build_attack().poison(splits.train).data
    out: dict[str, Any] = {"train_images": len(data), "batch_size": cfg.training.batch_size}
    for label, precision, cl in (("fp32", "fp32", False), ("bf16_channels_last", "bf16", True)):
        proj, net = project_epochs(cfg, data, splits.info, precision, cl)
        bare = bare_epoch(cfg, data, splits.info, precision, cl)
        out[label] = {"project_s": round(proj, 3), "bare_s": round(bare, 3), "ratio": round(proj / bare, 3)}
        if label == "fp32":
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, work / "victim.safetensors"
            )
            (work / "victim.json").write_text(cfg.model_dump_json())
    log("epoch", {**out, "target_ratio_max": 1.15})
    return {k: out[k]["project_s"] for k in ("fp32", "bf16_channels_last")}


def stage_victims(spec: Any, epoch_s: dict[str, float]) -> dict[str, float]:
    """The ablation's victim training: per epoch x epochs x victims (hours per precision)."""
    victims = spec.victim_configs()
    epochs = sum(v.training.epochs for v in victims)
    hours = {k: round(s * epochs / 3600, 4) for k, s in epoch_s.items()}
    log(
        "victims",
        {
            "victims": len(victims),
            "epochs_each": victims[0].training.epochs,
            "gpu_hours": hours,
            "note": "per epoch as measured in 'epoch' (SMOKE: a tiny model on 512 images, not the study's)",
        },
    )
    return hours


# ------------------------------------------------------------------------------ 3. packing


def reference_params() -> dict[str, Any]:
    """BaDExpert at the ablation's fixed values and reference searched values, early stop off."""
    return {
        "unlearn_lr": 1e-4,
        "unlearn_epochs": REFERENCE["unlearn_epochs"],
        "unlearn_batch_size": 128,
        "unlearn_early_stop_acc": None,
        "aux_lr": 0.1,
        "aux_epochs": REFERENCE["aux_epochs"],
        "aux_milestones": [2, 4, 6, 8] if REFERENCE["aux_epochs"] > 8 else [1],
    }


def fit_worker(work: Path, seed: int, fits: int) -> None:
    """One packed process: load the victim, say ready, wait for 'go', run ``fits`` BaDExpert fits."""
    torch.set_num_threads(PACK_THREADS)
    from safetensors.torch import load_file

    from bdx_study.detectors import FitContext, create_detector
    from bdx_study.protocol import ProtocolConfig
    from bdx_study.victims import VictimConfig

    cfg = VictimConfig.model_validate_json((work / "victim.json").read_text())
    model = cfg.build_model()
    model.load_state_dict(load_file(work / "victim.safetensors"))
    model = model.to(DEV).eval()
    splits = cfg.data.splits(cfg.dataset)
    protocol = ProtocolConfig(clean_set_size=REFERENCE["clean_set_size"], calibration_fraction=0.25)
    clean, holdout = protocol.defender_split(splits.reserve)
    ctx = FitContext(model=model, clean=clean, holdout=holdout, info=splits.info, device=DEV)
    # One untimed fit first: the CUDA context, cuDNN's kernel choice for training and the
    # optimizers' kernels are ready before the clock starts (as the epoch stage's warm-up epoch).
    warm = create_detector("badexpert", {**reference_params(), "aux_epochs": 1, "aux_milestones": [], "seed": 10**6})
    for comp in warm.components:
        warm.fit(comp, ctx)
    sync()
    print("ready", flush=True)
    sys.stdin.readline()
    start, secs = time.time(), {"expert": 0.0, "auxiliary": 0.0}
    for i in range(fits):
        family = create_detector("badexpert", {**reference_params(), "seed": seed * 100 + i})
        for comp in family.components:
            t = time.perf_counter()
            family.fit(comp, ctx)
            sync()
            secs[comp] += time.perf_counter() - t
    print(json.dumps({"start": start, "end": time.time(), "secs": secs}), flush=True)


def run_packed(work: Path, k: int, fits: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(PACK_THREADS), "MKL_NUM_THREADS": str(PACK_THREADS)}
    cmd = [sys.executable, __file__, "_fit", str(work)]
    procs = [
        subprocess.Popen([*cmd, str(i), str(fits)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for i in range(k)
    ]
    for p in procs:  # all loaded before any fit starts
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"a packed process did not start: {line!r}")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"a packed process failed (exit {p.returncode})")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    wall = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    per_fit = {c: sum(o["secs"][c] for o in outs) / (k * fits) for c in ("expert", "auxiliary")}
    return {"wall_s": round(wall, 2), "fits_per_min": round(k * fits / wall * 60, 2), "per_fit_s": per_fit}


def stage_pack(work: Path) -> dict[str, Any]:
    fits = 1 if SMOKE else 2
    rows = {k: run_packed(work, k, fits) for k in PACKING}
    one = rows[PACKING[0]]["fits_per_min"]
    for row in rows.values():
        row["relative"] = round(row["fits_per_min"] / one, 2)
    reference = {c: round(s, 3) for c, s in rows[1]["per_fit_s"].items()}
    log(
        "pack",
        {
            "threads_per_process": PACK_THREADS,
            "fits_per_process": fits,
            "reference": REFERENCE,
            "processes": {
                str(k): {**r, "per_fit_s": {c: round(s, 3) for c, s in r["per_fit_s"].items()}} for k, r in rows.items()
            },
            "target_relative_at_4_min": 2.5,
        },
    )
    return {"fit_s": reference, "relative": {k: r["relative"] for k, r in rows.items()}}


# ------------------------------------------------------------------------------ 4. projection


def grid_configs(spec: Any, family: str) -> list[dict[str, Any]]:
    """Every trial config of ``family`` (the grid sampler's whole grid)."""
    grid = spec.grid(family)
    keys = list(grid)
    return [{"detector": family, **dict(zip(keys, vals, strict=True))} for vals in itertools.product(*grid.values())]


def fit_units(params: Any, protocol: Any, component: str) -> float:
    """A fit's cost in finetune-image epochs (what its time scales with, early stopping aside)."""
    images = protocol.clean_set_size - (0 if protocol.calibration_size is not None else protocol.calibration_images)
    return images * (params.unlearn_epochs if component == "expert" else params.aux_epochs)


def count_fits(spec: Any) -> dict[str, Any]:
    """Per victim and component: fits with the stage cache (distinct stage keys over the grid) and
    without it (one per trial), with their cost in finetune-image epochs."""
    from bdx_study.detectors import create_detector
    from bdx_study.stages import StageStore

    if spec.search.sampler != "grid" or spec.search.num_trials is not None:
        raise ValueError("the projection counts whole grids (search.sampler: grid, num_trials: null)")
    victims = [v.key for v in spec.victim_configs()]
    out: dict[str, Any] = {"victims": len(victims), "trials": 0, "components": {}}
    for family_name in spec.families:
        configs = grid_configs(spec, family_name)
        out["trials"] += len(configs)
        trials = [spec.trial_config(c) for c in configs]
        for comp in create_detector(family_name, trials[0][1]).components:
            distinct: dict[str, float] = {}
            every = 0.0
            for name, params, protocol in trials:
                units = fit_units(params, protocol, comp)
                every += units
                distinct[StageStore.component_key(create_detector(name, params), comp, victims[0], protocol)] = units
            out["components"][comp] = {
                "fits_with_cache": len(distinct),
                "fits_without_cache": len(trials),
                "units_with_cache": sum(distinct.values()),
                "units_without_cache": every,
            }
    return out


def stage_project(spec: Any, victim_hours: dict[str, float] | None, pack: dict[str, Any] | None) -> None:
    counts = count_fits(spec)
    result: dict[str, Any] = {"counts_per_victim": counts}
    if pack is not None and victim_hours is not None:
        params = create_reference()
        ref_units = {c: fit_units(params[0], params[1], c) for c in ("expert", "auxiliary")}
        n = counts["victims"]
        hours = {}
        for label in ("with_cache", "without_cache"):
            secs = sum(counts["components"][c][f"units_{label}"] / ref_units[c] * pack["fit_s"][c] for c in ref_units)
            hours[label] = round(secs * n / 3600, 4)
        k_pack = 4 if 4 in pack["relative"] else max(pack["relative"], key=pack["relative"].get)
        packed = pack["relative"][k_pack]
        result["fit_gpu_hours"] = {
            "serial": hours,
            "packed": {"processes": k_pack, **{k: round(v / packed, 4) for k, v in hours.items()}},
        }
        result["total_gpu_hours"] = {
            precision: {k: round(victim_hours[precision] + v / packed, 4) for k, v in hours.items()}
            for precision in victim_hours
        }
        result["target_gpu_hours_max"] = 1.0
    log("project", result)


def create_reference() -> tuple[Any, Any]:
    from bdx_study.detectors.badexpert import BaDExpertParams
    from bdx_study.protocol import ProtocolConfig

    protocol = ProtocolConfig(clean_set_size=REFERENCE["clean_set_size"], calibration_fraction=0.25)
    return BaDExpertParams.model_validate(reference_params()), protocol


# ------------------------------------------------------------------------------ main


def main(argv: list[str]) -> int:
    if argv[:1] == ["_fit"]:
        fit_worker(Path(argv[1]), int(argv[2]), int(argv[3]))
        return 0
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py needs CUDA (torch.cuda.is_available() is False here); nothing measured. "
            "SMOKE=1 DEV=cpu runs a tiny version on the CPU."
        )
        return 0
    stage = argv[0] if argv else "all"
    if stage not in ("all", "epoch", "pack", "project"):
        print(f"unknown stage {stage!r}; known: all, epoch, pack, project", file=sys.stderr)
        return 2
    if DEV.type == "cpu":
        torch.set_num_threads(PACK_THREADS)
    name = torch.cuda.get_device_name() if DEV.type == "cuda" else platform.processor() or "cpu"
    log(
        "machine",
        {"device": str(DEV), "name": name, "torch": torch.__version__, "smoke": SMOKE, "cpus": os.cpu_count()},
    )
    spec = study()
    start = time.perf_counter()
    epoch_s = victim_hours = pack = None
    with tempfile.TemporaryDirectory(prefix="bdx-gpu-bench-") as tmp:
        work = Path(tmp)
        if stage in ("all", "epoch", "pack"):
            root = write_cifar_root(work / "data", *((1000, 1000) if SMOKE else (50000, 10000)))
            cfg = victim_config(spec, root)
            epoch_s = stage_epoch(cfg, work)
            victim_hours = stage_victims(spec, epoch_s)
        if stage in ("all", "pack"):
            pack = stage_pack(work)
        if stage in ("all", "project"):
            stage_project(spec, victim_hours, pack)
    log("total_s", round(time.perf_counter() - start, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
