"""examples/make_instruction_data.py up to the training step: annotations -> generate against its stand-in teacher
on 127.0.0.1 -> mix with a VQA-style CSV -> data check (the sft step is the one tests/cli already cover)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "make_instruction_data.py"


def test_example_makes_checks_and_mixes_data(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("make_instruction_data", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["x", "--images", "4", "--steps", "0", "--out", str(tmp_path)])
    module.main()
    out = capsys.readouterr().out
    assert "written     12 records" in out and "rejected    0" in out and "\nOK\n" in out
    generated = [json.loads(x) for x in (tmp_path / "data" / "generated.jsonl").read_text().splitlines()]
    assert sorted(r["id"].split(":")[1] for r in generated) == ["conversation"] * 4 + ["detail"] * 4 + \
        ["reasoning"] * 4
    mix = json.loads((tmp_path / "data" / "mix.json").read_text())
    assert {r["id"] for r in generated} <= {r["id"] for r in mix}
    vqa = [r for r in mix if r["id"].startswith("vqa-")]
    assert vqa and all(r["conversations"][0]["value"].endswith("Answer the question using a single word or phrase.")
                       for r in vqa)
