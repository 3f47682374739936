"""Commands that load no model import neither peft nor TRL's trainer (they cost seconds of start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
from lora_llava.cli.main import main
code = main(sys.argv[1:])
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"peft", "trl", "bitsandbytes"})
print(json.dumps({"code": code, "heavy": heavy, "torch": "torch" in sys.modules}))
"""


def _probe(tmp_path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    return json.loads(r.stdout.strip().splitlines()[-1]), r


def test_validate_imports_no_trainer_and_not_even_torch(tmp_path):
    """The derived sections come from the schema cache: the first run fills it, the second imports nothing heavy."""
    first, r = _probe(tmp_path, "validate", "recipes/demo.yaml")
    assert first["code"] == 0, r.stderr[-2000:]
    second, _ = _probe(tmp_path, "validate", "recipes/demo.yaml")
    assert second == {"code": 0, "heavy": [], "torch": False}


@pytest.mark.parametrize("args", [
    ("plan", "recipes/llava15_13b.yaml", "--gpu-memory", "80"),
    ("validate", "--keys"),
])
def test_other_commands_without_a_model_import_no_trainer(tmp_path, args):
    _probe(tmp_path, "validate", "recipes/demo.yaml")  # fills the schema cache
    result, r = _probe(tmp_path, *args)
    assert result["code"] == 0, r.stderr[-2000:]
    assert result["heavy"] == [], result


def test_report_and_data_check_import_no_trainer(tmp_path, shapes_data):
    folder, train_json, _ = shapes_data
    result, r = _probe(tmp_path, "data", "check", train_json, "--image-folder", folder, "--max-length", "256",
                       "--image-tokens", "16")
    assert result["code"] == 0 and result["heavy"] == [], (result, r.stderr[-2000:])
    result, _ = _probe(tmp_path, "report", tmp_path)  # no run there: exit 1, still nothing heavy imported
    assert result == {"code": 1, "heavy": [], "torch": False}
