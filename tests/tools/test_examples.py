"""The Python-API path of examples/custom_data.py: CSV rows -> records -> train(recipe, train_records=...)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lora_llava.config.recipe import recipe_from_dict

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_data.py"


def _example():
    spec = importlib.util.spec_from_file_location("custom_data", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_csv_rows_become_llava_records(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("image,question,answer\na.png,What is it?,A cat.\n,Say hi.,Hi.\n", encoding="utf-8")
    records = _example().records_from_csv(csv)
    assert records == [
        {"id": "d-2", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                          {"from": "gpt", "value": "A cat."}]},
        {"id": "d-3", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
    ]
    csv.write_text("image,question,answer\na.png,What is it?,\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"d.csv, line 2: empty answer"):
        _example().records_from_csv(csv)


def test_train_takes_python_records(make_recipe, shapes_data):
    import json

    from lora_llava.train.sft import train

    _, train_json, _ = shapes_data
    records = json.loads(Path(train_json).read_text())[:8]
    raw = make_recipe()
    raw["data"].pop("train")
    raw["train"].update(max_steps=2)
    result = train(recipe_from_dict(raw), train_records=records)
    report = json.loads((result.output_dir / "data_report.json").read_text())
    assert report["records"] == 8 and report["kept"] == 8
    assert len(result.losses) == 2
