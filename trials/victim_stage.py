"""Phase 1 of a study: make sure every victim is trained and cached, training the missing ones
as Ray tasks (in parallel, on any node) before the defense trials start."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import ray
import torch

from bdx_study._io import disk_full_error, disk_full_reported, is_disk_full
from bdx_study.plugins import load_plugins
from bdx_study.schema import victim_columns
from bdx_study.space import StudySpec
from bdx_study.tables import StudyTables
from bdx_study.training import pick_device
from bdx_study.victims import VictimCache, VictimConfig, VictimError, VictimRecord


def _train_one(
    cache_root: str, config: VictimConfig, threads: int, use_gpu: bool, plugins: tuple[str, ...]
) -> tuple[VictimRecord, bool]:
    load_plugins(plugins)  # the study's own attacks, architectures and datasets, before anything is built
    torch.set_num_threads(threads)
    places = {"victim cache": Path(cache_root), "temporary folder": Path(tempfile.gettempdir())}
    with disk_full_reported(f"training victim {config.name}", places):
        return VictimCache(cache_root).get_or_train(config, device=pick_device(prefer_gpu=use_gpu))


def ensure_victims(
    configs: list[VictimConfig], cache: VictimCache, *, cpu: float, gpu: float, plugins: tuple[str, ...] = ()
) -> list[tuple[VictimRecord, bool]]:
    """Return (record, trained_now) per config, in order; cached victims are not retrained.
    ``plugins``: the study's ``study.plugins``, imported by each training task first."""
    records: dict[str, tuple[VictimRecord, bool]] = {}
    missing = []
    for cfg in configs:
        rec = cache.load(cfg)
        if rec is None:
            missing.append(cfg)
        else:
            records[cfg.key] = (rec, False)
    if missing:
        print(f"[bdx-study] training {len(missing)} victim(s) ({len(configs) - len(missing)} cached)", flush=True)
        threads = max(1, math.floor(cpu))
        task = ray.remote(_train_one).options(num_cpus=cpu, num_gpus=gpu, max_retries=2)
        start = time.perf_counter()
        refs = {task.remote(str(cache.root), cfg, threads, gpu > 0, plugins): cfg for cfg in missing}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                rec, trained = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, VictimError) or is_disk_full(e):  # a clear message, not a remote traceback
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    if is_disk_full(e):
                        raise disk_full_error(e) from None
                    raise VictimError(str(e.cause)) from None
                raise
            records[rec.config.key] = (rec, trained)
            print(
                f"[bdx-study] victim {rec.config.name}: clean acc {rec.clean_acc:.3f}, attack success "
                f"{rec.attack_success:.3f} ({rec.train_seconds:.0f} s; {len(records)}/{len(configs)} ready, "
                f"{time.perf_counter() - start:.0f} s elapsed)",
                flush=True,
            )
    else:
        print(f"[bdx-study] all {len(configs)} victim(s) found in the cache {cache.root}", flush=True)
    return [records[c.key] for c in configs]


def prepare_victims(spec: StudySpec) -> tuple[VictimCache, list[tuple[VictimRecord, bool]]]:
    """The study's victim cache with every victim in it (the missing ones trained as Ray tasks),
    and (record, trained_now) per victim, all recorded in the study's victims table."""
    cache = VictimCache(spec.storage_root() / "victims")
    records = ensure_victims(
        spec.victim_configs(),
        cache,
        cpu=spec.resources.cpu,
        gpu=spec.resources.gpu,
        plugins=tuple(spec.study.plugins),
    )
    StudyTables(spec.study_dir).write_victims(
        [
            {
                **victim_columns(r.config),
                "clean_acc": r.clean_acc,
                "attack_success": r.attack_success,
                "train_seconds": r.train_seconds,
                "weights_sha256": r.weights_sha256,
                "cache_path": str(r.path),
            }
            for r, _ in records
        ]
    )
    return cache, records
