"""A second virtualenv with the LLaVA reference code (``llava-torch`` 1.2.2.post1, haotian-liu/LLaVA as packaged) and
the transformers it pins (4.36.2), built once and kept between test runs.

Where: ``$LORA_LLAVA_REFERENCE_VENV``, else ``~/.cache/lora-llava/test-envs/llava-torch-1.2.2.post1``. Building needs
the package index (a few minutes). Without it the tests that use it skip, saying why, unless
``LORA_LLAVA_REQUIRE_REFERENCE=1`` (CI sets it), which makes a failed build an error.

llava-torch pins torch 2.0.1, which has no build for this Python; it is installed with ``--no-deps`` beside torch 2.13.0
(CPU), which runs it unchanged. Its other pins are installed as the tests need them: transformers 4.36.2 (and the
tokenizers 0.15 it requires), sentencepiece, protobuf, accelerate, einops, numpy<2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ["transformers==4.36.2", "tokenizers>=0.15,<0.16", "sentencepiece", "protobuf", "accelerate",
            "einops", "numpy<2", "pillow", "safetensors"]
VERSION = "llava-torch==1.2.2.post1"
# Bump when PACKAGES change so a cached environment is rebuilt.
STAMP = "1:" + VERSION + ":" + ",".join(PACKAGES)


def venv_dir() -> Path:
    env = os.environ.get("LORA_LLAVA_REFERENCE_VENV")
    return Path(env) if env else Path.home() / ".cache/lora-llava/test-envs/llava-torch-1.2.2.post1"


def _build(folder: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
    pip = [str(folder / "bin/python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["--no-deps", VERSION], check=True)
    subprocess.run(pip + PACKAGES, check=True)


def reference_python() -> Path:
    """The reference virtualenv's python, built on first use; skips (or fails, under CI) when it cannot be built."""
    folder = venv_dir()
    stamp = folder / "lora-llava-stamp"
    python = folder / "bin/python"
    if python.is_file() and stamp.is_file() and stamp.read_text() == STAMP:
        return python
    try:
        _build(folder)
    except (subprocess.CalledProcessError, OSError) as e:
        message = f"cannot build the LLaVA reference environment in {folder}: {e}"
        if os.environ.get("LORA_LLAVA_REQUIRE_REFERENCE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    stamp.write_text(STAMP)
    return python
