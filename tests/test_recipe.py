"""The recipe as one typed value: what ``analyze`` writes is what ``export`` and ``fit`` read
back (every key, the figures named after the objective included), and the readers get typed
fields, not dict keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bdx_study.analysis.recipe import Recipe
from bdx_study.space import SpaceError

DOC: dict[str, Any] = {
    "study": "tiny",
    "study_dir": "/runs/studies/tiny",
    "made_from": {"trials": 2, "refits": 0, "heldout": 0},
    "default_detector": "badexpert",
    "default_detector_chosen_by": {"rule": "the selection rule", "board": [{"detector": "badexpert"}]},
    "domain": {
        "datasets": ["digits"],
        "architectures": ["small_cnn"],
        "attacks": ["badnet", "blend"],
        "input_shapes": [[1, 16, 16]],
        "num_classes": [10],
        "note": "the settings were chosen and checked on these victims only",
    },
    "detectors": {
        "badexpert": {
            "defaults": {"unlearn_lr": 0.0005, "aux_lr": 0.1, "seed": 0},
            "protocol": {"clean_set_size": 200, "calibration_fraction": 0.5, "target_fpr": 0.1},
            "seed_policy": {"rule": "the search's own fit", "fit": "t0001", "seed": 7, "clean_set_seed": 3},
            "selection": {
                "rule": "best worst-case",
                "chosen_trial": "t0001",
                "selection_worst_auroc_correct_only": 0.9,
            },
            "evidence": {
                "protocol_note": "evaluation split",
                "evaluation_worst_auroc_correct_only": 0.95,
                "uncertainty": {"chosen_by": "one fit"},
                "tuned_victims": {"per_victim": []},
                "held_out": {
                    "note": "folds",
                    "folds": [
                        {
                            "held_out": "attack=blend",
                            "strictly_held_out": True,
                            "held_out_worst_auroc_correct_only": 0.8,
                        }
                    ],
                },
            },
        }
    },
}


def test_written_and_read_back_unchanged(tmp_path: Path) -> None:
    path = Recipe.model_validate(DOC).write(tmp_path / "recipe.yaml")
    assert path.read_text() == yaml.safe_dump(DOC, sort_keys=False)  # every key, in analyze's order
    recipe = Recipe.load(path)
    assert recipe.path == path and recipe.study == "tiny" and recipe.domain is not None
    assert recipe.domain.input_shapes == [[1, 16, 16]]
    family, entry = recipe.family()
    assert family == "badexpert" and entry.chosen_trial == "t0001"
    (fold,) = entry.held_out_folds
    assert fold.figure() == ("worst_auroc_correct_only", 0.8) and fold.strictly_held_out is True
    params, protocol = entry.config()  # the seed policy's seed and clean-set draw applied
    assert params["seed"] == 7 and protocol.clean_set_seed == 3 and protocol.clean_set_size == 200


def test_a_recipe_without_optional_parts_writes_no_nulls(tmp_path: Path) -> None:
    doc = {"study": "old", "detectors": {"strip": {"defaults": {}, "protocol": {}}}}
    path = Recipe.model_validate(doc).write(tmp_path / "recipe.yaml")
    assert yaml.safe_load(path.read_text()) == doc
    recipe = Recipe.load(path)
    assert recipe.domain is None and recipe.made_from is None
    assert recipe.detectors["strip"].chosen_trial is None and recipe.detectors["strip"].held_out_folds == []


def test_unknown_family_and_bad_types_are_one_error_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    recipe = Recipe.model_validate(DOC)
    with pytest.raises(ValueError, match="no robust defaults for detector 'ted'; the recipe has: badexpert"):
        recipe.family("ted")
    bad = yaml.safe_load(yaml.safe_dump(DOC))
    bad["detectors"]["badexpert"]["selection"]["chosen_trial"] = 17
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SpaceError, match=rf"{path}: detectors\.badexpert\.selection\.chosen_trial"):
        Recipe.load(path)
