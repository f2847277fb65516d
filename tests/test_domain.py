"""A recipe states its domain: applying it outside (another architecture, input size, class
count, dataset or attack) warns, naming what it was validated on and the nearest shipped study;
inside, nothing is said. ``export`` prints the warnings and records them in the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from bdx_study.analysis.domain import (
    check_domain,
    nearest_study,
    render_warnings,
    shipped_studies,
    unseen_triggers,
)
from bdx_study.analysis.recipe import Recipe
from bdx_study.data import dataset_info
from bdx_study.space import builtin_space, load_space

from .conftest import tiny_study, write_study

QUICKSTART_DOC: dict[str, Any] = {
    "study": "quickstart",
    "default_detector": "badexpert",
    "domain": {
        "datasets": ["digits"],
        "architectures": ["small_cnn"],
        "attacks": ["badnet", "blend"],
        "input_shapes": [[1, 16, 16]],
        "num_classes": [10],
    },
    "detectors": {"badexpert": {"defaults": {}, "protocol": {}}},
}
QUICKSTART_LIKE = Recipe.model_validate(QUICKSTART_DOC)


def test_own_domain_says_nothing() -> None:
    assert (
        check_domain(
            QUICKSTART_LIKE,
            dataset="digits",
            architecture="small_cnn",
            input_shape=(1, 16, 16),
            num_classes=10,
            attack="blend",
        )
        == []
    )
    assert render_warnings([], command="fit") == ""


def test_digits_recipe_on_a_cifar_resnet_names_paper_cifar10() -> None:
    warnings = check_domain(QUICKSTART_LIKE, architecture="resnet18", input_shape=(3, 32, 32), num_classes=10)
    assert len(warnings) == 2  # the architecture and the input shape; 10 classes is inside
    arch, shape = warnings
    assert "architecture resnet18" in arch and "validated on architecture(s) small_cnn only" in arch
    assert "input shape 3x32x32" in shape and "validated on input shape(s) 1x16x16 only" in shape
    for w in warnings:
        assert "study quickstart" in w and "search_spaces/paper-cifar10.yaml" in w
    block = render_warnings(warnings, command="fit")
    assert block.startswith("bdx-study: warning: fit:") and "OUTSIDE" in block and block.count("\n  - ") == 2


def test_each_way_outside_is_named() -> None:
    warnings = check_domain(
        QUICKSTART_LIKE,
        dataset="fashion_mnist",
        architecture="small_cnn",
        input_shape=(1, 28, 28),
        num_classes=7,
        attack="wanet",
    )
    text = "\n".join(warnings)
    assert len(warnings) == 4
    for expected in ("dataset fashion_mnist", "input shape 1x28x28", "7 classes", "attack wanet", "badnet, blend"):
        assert expected in text, expected
    assert "search_spaces/zoo.yaml" in warnings[0]  # Fashion-MNIST 28x28: the zoo study
    # the attack warning names a shipped study whose victims carry wanet (read from its file)
    (attack_warning,) = [w for w in warnings if w.startswith("attack wanet")]
    suggested = attack_warning.split("or run search_spaces/")[1].split(" ")[0]
    assert "wanet" in next(s for s in shipped_studies() if s.file == suggested).attacks
    assert not [
        w
        for w in check_domain(
            QUICKSTART_LIKE, architecture="small_cnn", input_shape=(1, 16, 16), num_classes=10, attack="no_such_attack"
        )
        if "or run" in w
    ]


@pytest.mark.parametrize(
    ("shape", "arch", "detector", "file", "matches"),
    [
        ((1, 16, 16), "small_cnn", "badexpert", "quickstart.yaml", True),
        ((1, 16, 16), "small_cnn", "strip", "compare.yaml", True),
        ((1, 16, 16), "small_cnn", "teco", "compare-all.yaml", True),
        ((1, 28, 28), "resnet18", None, "zoo.yaml", True),
        ((3, 32, 32), "small_cnn", None, "paper-cifar10.yaml", True),
        ((3, 64, 64), "resnet18", None, "paper-cifar10.yaml", False),
    ],
)
def test_nearest_study(shape: tuple[int, int, int], arch: str, detector: str | None, file: str, matches: bool) -> None:
    study, matched = nearest_study(architecture=arch, input_shape=shape, detector=detector)
    assert (study.file, matched) == (file, matches)


def test_nothing_shipped_matches_suggests_a_study_of_your_own() -> None:
    (w, *_) = check_domain(QUICKSTART_LIKE, architecture="resnet18", input_shape=(3, 64, 64), num_classes=10)
    assert "no shipped study covers resnet18 of 3x64x64 inputs" in w and "study quickstart" in w
    assert "paper-cifar10.yaml" in w  # the nearest to start from


def test_a_recipe_without_a_domain_says_so() -> None:
    old = Recipe.model_validate({k: v for k, v in QUICKSTART_DOC.items() if k != "domain"})
    (w,) = check_domain(old, architecture="small_cnn", input_shape=(1, 16, 16), num_classes=10)
    assert "states no domain" in w and "bdx-study analyze" in w


def test_shipped_studies_are_read_from_the_study_files() -> None:
    """The shipped studies a warning may name are the files in search_spaces/ (the quickstart
    first), each as its file says; the two that search |D_c| (ablations, figures) are left out."""
    studies = shipped_studies()
    files = sorted(p.name for p in builtin_space().parent.glob("*.yaml"))
    assert studies[0].file == "quickstart.yaml"
    assert sorted(s.file for s in studies) == sorted(set(files) - {"ablation.yaml", "figures.yaml"})
    for s in studies:
        spec = load_space(builtin_space(s.file.removesuffix(".yaml")))
        victims = spec.victim_configs()
        assert set(s.datasets) == {v.dataset for v in victims}, s.file
        assert set(s.architectures) == {v.architecture for v in victims}, s.file
        assert s.input_shape == tuple(dataset_info(s.datasets[0]).input_shape), s.file
        assert s.families == tuple(spec.families) and s.what == spec.study.description, s.file


def test_export_warns_outside_the_recipes_domain(tmp_path: Path, capsys: Any) -> None:
    """export on a victim its recipe was not validated on prints the warning before fitting and
    records it in the bundle; on the recipe's own victims it prints nothing."""
    from bdx_study.analysis.export import export_detector
    from bdx_study.detector import Detector
    from bdx_study.victims import VictimCache

    torch.set_num_threads(1)
    doc = tiny_study(tmp_path, victims__training={"epochs": 3, "lr": 2.0e-3})
    spec = load_space(write_study(tmp_path, doc))
    (vcfg,) = spec.victim_configs()
    VictimCache(spec.storage_root() / "victims").get_or_train(vcfg, device=torch.device("cpu"))
    entry = {
        "defaults": {"unlearn_lr": 5e-4, "unlearn_batch_size": 32, "aux_epochs": 2, "aux_milestones": [1]},
        "protocol": {"clean_set_size": 100, "target_fpr": 0.1},
        "selection": {"chosen_trial": None},
    }

    def export(domain: dict[str, Any], name: str) -> Path:
        recipe = {"study": "tiny", "default_detector": "badexpert", "domain": domain, "detectors": {"badexpert": entry}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        bundle, _ = export_detector(spec, spec.study_dir, tmp_path / name, recipe_path=path, log_to_mlflow=False)
        return bundle

    zoo_domain = {
        "datasets": ["fashion_mnist"],
        "architectures": ["small_cnn"],
        "attacks": ["badnet"],
        "input_shapes": [[1, 28, 28]],
        "num_classes": [10],
    }
    bundle = export(zoo_domain, "outside")
    err = capsys.readouterr().err
    assert "bdx-study: warning: export:" in err and "dataset digits" in err and "input shape 1x16x16" in err
    assert "search_spaces/quickstart.yaml" in err
    assert len(Detector.load(bundle).manifest["provenance"]["domain_warnings"]) == 2

    own = {**zoo_domain, "datasets": ["digits"], "input_shapes": [[1, 16, 16]]}
    bundle = export(own, "inside")
    assert "warning" not in capsys.readouterr().err
    assert Detector.load(bundle).manifest["provenance"]["domain_warnings"] == []


def test_what_the_domain_check_cannot_see_names_the_weakest_held_out_attack() -> None:
    fold = {"strictly_held_out": True, "held_out_ci95": [0.9, 1.0], "held_out_victims": 1}
    doc = {
        **QUICKSTART_DOC,
        "detectors": {
            "committee": {
                "defaults": {},
                "protocol": {},
                "evidence": {
                    "held_out": {
                        "folds": [
                            {**fold, "held_out": "attack=badnet", "held_out_worst_auroc_correct_only": 0.999},
                            {**fold, "held_out": "attack=blend", "held_out_worst_auroc_correct_only": 0.981},
                            {**fold, "held_out": "victim_seed=1", "held_out_worst_auroc_correct_only": 0.5},
                        ]
                    }
                },
            }
        },
    }
    recipe = Recipe.model_validate(doc)
    line = unseen_triggers(recipe, "committee")
    assert line.startswith("unchecked: the recipe was tuned on attacks badnet, blend")
    assert "committee's weakest held-out attack: blend, worst_auroc_correct_only 0.981 (strictly held out)" in line
    assert "\n" not in line  # one line
    assert "no held-out-attack evidence for badexpert" in unseen_triggers(recipe, "badexpert")
