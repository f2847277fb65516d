"""Checks a study must pass before any work starts, shared by ``validate`` and ``launch`` (so that
whatever ``launch`` would refuse, ``validate`` refuses too): the storage folder, the data and its
split sizes, and the resources a trial asks for. Each problem names the file, the key and the
value, and says what is allowed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bdx_study.attacks import check_attack_data, user_attack
from bdx_study.data import DataError, Labels, dataset_info, load_labels, resolve_root
from bdx_study.space import SpaceError, StudySpec, one_line


def check_storage(spec: StudySpec, source: str) -> None:
    """``study.storage`` is a folder, or can become one (its first existing parent is a writable folder)."""
    root = spec.storage_root()
    p = root
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise SpaceError(
            f"{source}: study.storage: {spec.study.storage!r} -> {p} is a file, not a folder; choose a folder"
        )
    if not os.access(p, os.W_OK | os.X_OK):
        raise SpaceError(f"{source}: study.storage: {p} is not writable; choose a folder you can write to")


def check_data(spec: StudySpec, source: str) -> None:
    """Every dataset is readable and holds the splits the study asks for, and every attack can
    be carried by its victim's training split. Reads labels and image shapes (no pixels where the
    dataset has a label reader: :func:`~bdx_study.data.load_labels`): no torch."""
    d = spec.data
    root = resolve_root(d.root)
    if root is not None and root.exists() and not root.is_dir():
        raise SpaceError(
            f"{source}: data.root: {d.root!r} -> {root} is a file, not a folder; give the datasets' folder"
        )
    loaded: dict[str, tuple[Labels, Labels]] = {}
    for ds in spec.victims.datasets:
        try:
            loaded[ds] = load_labels(ds, root, d.download)
        except (DataError, OSError) as e:
            why = " ".join(str(e).split()).removeprefix(f"dataset {ds!r}: ")
            if root is not None and not root.exists():
                why = f"data.root {root} does not exist; {why}"
            raise SpaceError(f"{source}: data (dataset {ds!r}): {why}") from None
        train, test = loaded[ds]
        n_test, n_train = len(test.labels), len(train.labels)
        problems = []
        if d.reserve_size > n_test - 2:
            problems.append(
                f"data.reserve_size: {d.reserve_size} leaves fewer than 2 of the {n_test} test images of {ds!r} "
                "for selection and evaluation"
            )
        else:
            available = n_test - d.reserve_size
            n_held = available if d.eval_size is None else d.eval_size
            if d.eval_size is not None and not 2 <= d.eval_size <= available:
                problems.append(
                    f"data.eval_size: {d.eval_size} must be in [2, {available}] ({ds!r} has {n_test} test images, "
                    f"{d.reserve_size} of them reserved)"
                )
            elif not 1 <= round(n_held * d.selection_fraction) < n_held:
                problems.append(
                    f"data.selection_fraction: {d.selection_fraction} of {n_held} held-out images leaves "
                    f"{round(n_held * d.selection_fraction)} for selection; both splits need at least one"
                )
        if d.train_size is not None and d.train_size > n_train:
            problems.append(f"data.train_size: {d.train_size} exceeds the {n_train} training images of {ds!r}")
        if problems:
            raise SpaceError(one_line(source, [f"{source}: {p}" for p in problems]))
    labels: dict[str, np.ndarray] = {}  # victims share their training split: cut it once per dataset
    for v in spec.victim_configs():
        try:
            if user_attack(v.attack.name):  # its checks are in its class and may read the images
                v.check_data()
                continue
            if v.dataset not in labels:
                labels[v.dataset] = d.train_labels(v.dataset)
            info = dataset_info(v.dataset)
            shape = loaded[v.dataset][0].shape[1:]
            check_attack_data(
                v.attack.name, v.attack.params, info.input_shape, info.num_classes, shape, labels[v.dataset]
            )
        except ValueError as e:  # DataError too
            raise SpaceError(f"{source}: victims.attacks ({v.attack.name}): {e}") from None


def check_local_resources(spec: StudySpec, source: str) -> None:
    """Without --address, launch runs on this machine: a trial must fit on it."""
    cpus = os.cpu_count() or 1
    if spec.resources.cpu > cpus:
        raise SpaceError(
            f"{source}: resources.cpu: {spec.resources.cpu:g} CPUs per trial, but this machine has {cpus}; "
            "lower it, or run on a cluster with --address"
        )
    if spec.resources.gpu > 0:
        import torch

        gpus = torch.cuda.device_count()
        if spec.resources.gpu > gpus:
            raise SpaceError(
                f"{source}: resources.gpu: {spec.resources.gpu:g} GPU(s) per trial, but this machine has {gpus}; "
                "set resources.gpu: 0, or run on a GPU cluster with --address"
            )


def preflight(spec: StudySpec, source: str | Path, *, local: bool = True) -> None:
    """Everything :mod:`bdx_study.space` cannot check from the file alone; ``local``: the study
    will run on a Ray this machine starts (no --address), so a trial must fit on this machine."""
    src = str(source)
    check_storage(spec, src)
    check_data(spec, src)
    if local:
        check_local_resources(spec, src)
