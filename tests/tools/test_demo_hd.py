"""The high-resolution demo (recipes/demo_hd.yaml): its tiny LLaVA-NeXT and data, and the full run when the model
side loads llava-next checkpoints."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lora_llava.config.recipe import recipe_from_dict
from lora_llava.errors import ModelError

ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp_path, **demo):
    raw = yaml.safe_load((ROOT / "recipes" / "demo_hd.yaml").read_text())
    folder = tmp_path / "demo_data_hd"
    raw["model"]["llava"] = str(folder / "model")
    raw["data"].update(train=str(folder / "train.json"), eval=str(folder / "eval.json"), image_folder=str(folder))
    raw["eval"]["questions"] = str(folder / "eval.json")
    raw["train"]["output_dir"] = str(tmp_path / "run")
    raw["demo"].update(demo)
    return recipe_from_dict(raw, check_files=False)


def test_demo_hd_model_and_data(tmp_path):
    """The demo writes a LlavaNext checkpoint plain transformers loads, and images whose counts differ; the dataset's
    counts equal the saved processor's, and a collated batch runs through the model."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from lora_llava.data import LlavaCollator
    from lora_llava.demo import prepare_demo
    from lora_llava.llava.anyres import AnyresGrid
    from lora_llava.train.sft import build_datasets

    recipe = _recipe(tmp_path, train_samples=12, eval_samples=4)
    prepare_demo(recipe)
    model = LlavaNextForConditionalGeneration.from_pretrained(recipe.model.llava).eval()
    processor = AutoProcessor.from_pretrained(recipe.model.llava)
    assert type(processor).__name__ == "LlavaNextProcessor"
    grid = AnyresGrid.from_config(model.config)
    assert grid.pinpoints == ((48, 96), (96, 48), (96, 96)) and grid.worst_case == 192
    train_ds, eval_ds = build_datasets(recipe, processor, model.config)
    assert len(train_ds) == 12 and len(eval_ds) == 4
    counts = [row["image_tokens"][0] for row in train_ds.to_hf()]
    assert len(set(counts)) >= 4 and 78 <= min(counts) and max(counts) <= 192
    image_id = model.config.image_token_id
    for row in list(train_ds.to_hf())[:4]:
        image = Image.open(Path(recipe.data.image_folder) / row["image_files"][0]).convert("RGB")
        out = processor(images=[image], text=["<image>\nhi"], return_tensors="pt")
        assert int((out["input_ids"] == image_id).sum()) == row["image_tokens"][0]
    collate = LlavaCollator(processor.image_processor, processor.tokenizer.pad_token_id, recipe.data.image_folder,
                            grid=grid)
    batch = collate([train_ds[k] for k in range(4)])
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def _model_side_loads_llava_next(tmp_path) -> bool:
    from lora_llava.demo import make_demo_model
    from lora_llava.llava.spec import ModelSpec

    recipe = _recipe(tmp_path)
    make_demo_model(recipe.model.llava, image_size=16, hidden_size=32, anyres=True)
    try:
        ModelSpec.from_recipe(recipe)
    except ModelError:
        return False
    return True


def test_full_demo_hd_learns(tmp_path):
    """As test_demo's: the HD demo through the CLI learns, its held-out accuracy printed (chance is 1/12). Measured:
    0.842 (101/120) at the recipe's 500 steps on a 2-core CPU VM, below the LLaVA-1.5 demo's 0.90 bar; the loss was
    still falling (a longer run was not finished here), so the bar is 0.75."""
    if not _model_side_loads_llava_next(tmp_path / "probe"):
        pytest.skip("needs the model side of issue 19: lora-llava loading llava-next checkpoints")
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "lora_llava", "sft", "recipes/demo_hd.yaml"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    match = re.search(r"held-out accuracy: ([0-9.]+) \((\d+)/(\d+)", r.stdout)
    assert match, r.stdout
    print(match[0])
    assert int(match[3]) == 120 and float(match[1]) >= 0.75, r.stdout
