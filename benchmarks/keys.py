"""Print every shipped study's cache keys: each victim's key and, for a fixed sample of each
family's configs (the fixed values, each searched range's ends, 4 seeded random draws), every
component's stage key and the layout key. A refactor that keeps caches valid prints the same
lines before and after: ``python benchmarks/keys.py > before.txt`` ... ``diff before.txt after.txt``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _samples(spec: Any, family: str) -> list[dict[str, Any]]:
    searched = spec.searched(family)
    configs: list[dict[str, Any]] = [{}]
    for pick in ("low", "high"):
        c: dict[str, Any] = {}
        for k, d in searched.items():
            vals = _grid(d)
            c[k] = vals[0] if pick == "low" else vals[-1]
        configs.append(c)
    rng = random.Random(0)
    for _ in range(4):
        configs.append({k: rng.choice(_grid(d)) for k, d in searched.items()})
    return [{"detector": family, **c} for c in configs]


def _grid(d: Any) -> list[Any]:
    if getattr(d, "dist", None) == "choice":
        return list(d.values)
    low, high = d.low, d.high
    if isinstance(low, int) and isinstance(high, int):
        return [low, (low + high) // 2, high]
    return [low, (low + high) / 2, high]


def main() -> None:
    from bdx_study.detectors import create_detector
    from bdx_study.space import load_space
    from bdx_study.stages import StageStore

    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        spec = load_space(path)
        victims = spec.victim_configs()
        for v in victims:
            print(path.name, "victim", v.name, v.key)
        vkey = victims[0].key
        for family in spec.families:
            for config in _samples(spec, family):
                name, params, protocol = spec.trial_config(config)
                det = create_detector(name, params)
                comps = det.fitted_components() if hasattr(det, "fitted_components") else det.components
                keys = [StageStore.component_key(det, c, vkey, protocol) for c in comps]
                print(
                    path.name,
                    "stage",
                    family,
                    sorted(config.items()),
                    keys,
                    StageStore.layout_key({"victim": vkey}, protocol),
                )


if __name__ == "__main__":
    main()
