"""How long `bdx-study validate` takes on the shipped study files (target: under 2 s on a good file).

    python benchmarks/validate.py [--repeats 5] [--spaces search_spaces/quickstart.yaml ...]

Runs the real command in a fresh process each time (imports included: they are most of the
cost) and prints, per file, the median and the range of the wall times, plus the import time
of the modules validation needs (``python -X importtime``). Prints the figures; nothing is
asserted. Shipped files whose data is not on this machine (CIFAR-10 without a data root) fail
their data check fast and are reported as such.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["quickstart.yaml", "compare.yaml", "compare-all.yaml", "zoo.yaml", "figures.yaml"]


def _bdx(*args: str) -> list[str]:
    return [sys.executable, "-c", "from bdx_study.cli import main; raise SystemExit(main())", *args]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--spaces", nargs="*", default=[str(ROOT / "search_spaces" / f) for f in DEFAULT])
    args = ap.parse_args()
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)"
    print(f"machine: {machine}; python {platform.python_version()}")
    for space in args.spaces:
        times, rc, out = [], 0, ""
        for _ in range(args.repeats):
            t = time.perf_counter()
            p = subprocess.run(_bdx("validate", "--space", space), capture_output=True, text=True, cwd=ROOT)
            times.append(time.perf_counter() - t)
            rc, out = p.returncode, (p.stdout + p.stderr).strip().splitlines()[-1:]
        status = "OK" if rc == 0 else f"exit {rc}: {' '.join(out)[:100]}"
        print(
            f"{Path(space).name:20s} median {statistics.median(times):.2f} s "
            f"(min {min(times):.2f}, max {max(times):.2f}, {args.repeats} runs)  {status}"
        )
    # Where the time goes: the cumulative import time of the top-level packages validation loads.
    p = subprocess.run(
        [sys.executable, "-X", "importtime", *_bdx("validate", "--space", args.spaces[0])[1:]],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    cumulative: dict[str, int] = {}
    for line in p.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            cumulative[m.group(3)] = max(cumulative.get(m.group(3), 0), int(m.group(1)))
    shown = ["numpy", "pydantic", "yaml", "bdx_study.space", "bdx_study.preflight", "bdx_study.cli"]
    print(
        "imports (cumulative, first file): "
        + ", ".join(f"{k} {cumulative[k] / 1e6:.2f} s" for k in shown if k in cumulative)
    )
    for heavy in ("torch", "sklearn", "scipy", "optuna", "ray", "mlflow", "torchvision", "pyarrow"):
        print(f"  {heavy}: {'imported' if heavy in cumulative else 'not imported'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
