"""Start-up time of the commands that load no model, next to ``python -c "import torch"``.

Usage (from the repository root): ``python -m benchmarks.startup [--runs N]``

Each command runs N times, interleaved (torch, validate, plan, torch, ...) so that load on the machine hits all of
them alike; the median wall time of each and its ratio to ``import torch`` are printed. The schema cache
(``$LORA_LLAVA_CACHE/schema``) is filled by one untimed ``validate`` first: the figures are those of every run after
the first one with the installed package versions. Also checked: ``validate`` imports neither peft nor trl.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "lora-llava validate recipes/demo.yaml": [sys.executable, "-m", "lora_llava", "validate", "recipes/demo.yaml"],
    "lora-llava plan recipes/llava15_13b.yaml": [sys.executable, "-m", "lora_llava", "plan",
                                                "recipes/llava15_13b.yaml", "--gpu-memory", "24"],
}
_PROBE = ("import sys, runpy; sys.argv = ['lora-llava', 'validate', 'recipes/demo.yaml']\n"
          "try:\n    runpy.run_module('lora_llava', run_name='__main__')\nexcept SystemExit:\n    pass\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('peft', 'trl', 'torch')), file=sys.stderr)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs of each command (default 7)")
    args = parser.parse_args()
    subprocess.run(COMMANDS["lora-llava validate recipes/demo.yaml"], cwd=ROOT, capture_output=True, check=True)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):
        for name, cmd in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, capture_output=True, check=False)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["python -c 'import torch'"])
    print(f"{'command':<45} {'median s':>9} {'x import torch':>15}   (runs: {args.runs})")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<45} {median:9.2f} {median / base:15.2f}")
    probe = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, check=False)
    modules = ast.literal_eval(probe.stderr.strip().splitlines()[-1])
    heavy = sorted({m.split(".")[0] for m in modules} & {"peft", "trl"})
    print(f"modules validate imports: peft / trl {heavy or 'none'}; torch {'yes' if 'torch' in modules else 'no'}")


if __name__ == "__main__":
    main()
