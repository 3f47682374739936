"""Checks the wheels ``fetch_wheels.sh`` put in ``.whl/`` before they travel to the GPU machine: one version of each
package, every requirement met by another carried wheel or by a package the H200 image has (device notes, KINDS.md),
and the carried size against the 64 MiB the device tool moves per call (working tree included).

    python -m benchmarks.gpu.wheel_check [.whl]

Exit 1 on two versions of one package, an unmet requirement, or a total over 64 MiB.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from .._shared.machine import REPO_ROOT

LIMIT = 64 * 2**20
PYTHON = "3.12"  # the image's python3 (3.12.3 as sessions saw it)
# The image's versions as sessions saw them (KINDS.md's pip list row, 2026-11); other packages are there with a
# version nobody wrote down.
IMAGE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                  "sentencepiece": "0.2.2", "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0",
                  "triton": "3.6.0"}
# KINDS.md's list of the Python packages on the image (2026-11-17), the names the requirement check needs.
IMAGE_PACKAGES = {
    "accelerate", "aiohttp", "anyio", "certifi", "charset-normalizer", "click", "filelock", "fsspec", "h11",
    "hf-xet", "httpcore", "httpx", "huggingface-hub", "idna", "jinja2", "markupsafe", "multidict", "numpy",
    "packaging", "pandas", "peft", "pillow", "psutil", "pyarrow", "python-dateutil", "pyyaml", "regex", "requests",
    "rich", "safetensors", "sentencepiece", "shellingham", "six", "sympy", "tokenizers", "torch", "tqdm",
    "transformers", "triton", "typer", "typing-extensions", "urllib3", "xxhash", "yarl", "zipp", "networkx",
    "mpmath", "protobuf", "setuptools", "wheel", "pip", "tzdata",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode())


def tree_bytes() -> int:
    """Bytes of what travels besides carried paths: tracked and untracked-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    return sum((REPO_ROOT / f).stat().st_size for f in files if f and (REPO_ROOT / f).is_file())


def main() -> None:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else REPO_ROOT / ".whl")
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        sys.exit(f"no wheels in {folder}: run benchmarks/gpu/fetch_wheels.sh")
    carried: dict[str, str] = {}
    problems = []
    print(f"{'wheel':<62} {'MiB':>7}")
    for w in wheels:
        meta = metadata(w)
        name = norm(meta["Name"])
        if name in carried:
            problems.append(f"two versions of {name}: {carried[name]} and {meta['Version']}")
        carried[name] = meta["Version"]
        print(f"{w.name:<62} {w.stat().st_size / 2**20:7.2f}")
    env = {"python_version": PYTHON, "python_full_version": f"{PYTHON}.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    unrecorded: dict[str, set[str]] = {}
    for w in wheels:
        meta = metadata(w)
        who = f"{meta['Name']} {meta['Version']}"
        if meta["Requires-Python"] and Version(f"{PYTHON}.3") not in SpecifierSet(meta["Requires-Python"]):
            problems.append(f"{who}: Requires-Python {meta['Requires-Python']} excludes {PYTHON}")
        for line in meta.get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = norm(req.name)
            have = carried.get(name) or IMAGE_VERSIONS.get(name)
            where = "carried" if name in carried else "image"
            if have is None and name not in IMAGE_PACKAGES:
                problems.append(f"{who} needs {req}: neither carried nor on the image")
            elif have is not None and req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{who} needs {req}: {where} {have}")
            elif have is None and req.specifier:
                unrecorded.setdefault(name, set()).add(str(req.specifier))
    if unrecorded:
        print("on the image in a version nobody recorded (the run's env_check reports them): " +
              ", ".join(f"{n} {' '.join(sorted(v))}" for n, v in sorted(unrecorded.items())))
    total = sum(w.stat().st_size for w in folder.rglob("*") if w.is_file())
    tree = tree_bytes()
    print(f"carried folder {folder.name}: {total / 2**20:.2f} MiB; working tree {tree / 2**20:.2f} MiB; together "
          f"{(total + tree) / 2**20:.2f} MiB of the {LIMIT / 2**20:.0f} MiB a device call moves")
    if total + tree > LIMIT:
        problems.append(f"over the device tool's 64 MiB by {(total + tree - LIMIT) / 2**20:.2f} MiB")
    for p in problems:
        print(f"problem: {p}")
    print("wheel check: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
