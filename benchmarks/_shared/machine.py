"""The machine and library versions a report names, and the command that produced it."""

from __future__ import annotations

import importlib.util
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository root: the benchmarks run from here as ``python -m benchmarks.<script>``."""
GiB = 1024**3


def machine() -> str:
    """CPU model and core count."""
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   platform.processor() or platform.machine())
    return f"{cpu}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)"


def versions(modules=("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "flash_attn",
                      "liger_kernel")) -> str:
    """``name version`` of each module; ``name -`` when it is not installed."""
    out = []
    for mod in modules:
        if importlib.util.find_spec(mod) is None:
            out.append(f"{mod} -")
            continue
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception as e:  # noqa: BLE001 - a broken optional install is reported, not fatal
            out.append(f"{mod} (import failed: {type(e).__name__})")
    return ", ".join(out)


def machine_line(cuda: bool) -> str:
    """CPU, RAM, GPU (``nvidia-smi``), python and library versions on one line."""
    line = f"{machine()}, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB RAM"
    if cuda:
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            gpu = "nvidia-smi not available"
        line += f"; GPU {gpu}"
    else:
        line += "; no GPU"
    return f"{line}; python {platform.python_version()}, {versions()}"


def command_line(module: str) -> str:
    """How this process was started, as a command to type at the repository root: ``python -m <module> ARGS``."""
    return " ".join(["python -m", module, *(shlex.quote(a) for a in sys.argv[1:])])
