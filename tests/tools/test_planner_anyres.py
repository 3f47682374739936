"""The planner on AnyRes (LLaVA-NeXT / LLaVA-1.5-HD) recipes: the worst-case tile count, data.max_tiles, the 13B HD
recipe against a 24 GB card, the LLaVA-1.6 checkpoints known offline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from lora_llava.config.recipe import load_recipe, recipe_from_dict
from lora_llava.config.sections import ModelSection
from lora_llava.errors import PlanError
from lora_llava.llava.anyres import AnyresGrid, grid_pinpoints
from lora_llava.planner import KNOWN_CONFIGS, GiB, plan, shapes_for, suggestions

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
HAS_GRID_KEY = "image_grid_pinpoints" in {f.name for f in dataclasses.fields(ModelSection)}
PROJECTOR = "inputs embeds + projector activations"


def _hd_13b(**data):
    """recipes/llava15_hd_13b.yaml and its Shapes. Without the model side's model.image_grid_pinpoints key on this
    branch, the key is taken out of the recipe and its grid given to the planner directly (the same numbers)."""
    raw = yaml.safe_load((RECIPES / "llava15_hd_13b.yaml").read_text())
    raw["data"].update(data)
    pins = raw["model"]["image_grid_pinpoints"] if HAS_GRID_KEY else raw["model"].pop("image_grid_pinpoints")
    recipe = recipe_from_dict(raw, check_files=False)
    shapes = shapes_for(recipe)
    if not HAS_GRID_KEY:
        shapes = dataclasses.replace(shapes, grid=AnyresGrid(336, 14, tuple(map(tuple, pins))))
    assert shapes.grid.pinpoints == ((336, 672), (672, 336), (672, 672))
    return recipe, shapes


def test_worst_case_tiles_and_image_tokens():
    recipe, shapes = _hd_13b()
    plain = dataclasses.replace(shapes, grid=None)
    hd, base = plan(recipe, 24, shapes=shapes), plan(recipe, 24, shapes=plain)
    assert (shapes.views, shapes.image_tokens, plain.views, plain.image_tokens) == (5, 2928, 1, 576)
    d, vd, e = shapes.hidden, shapes.vision_hidden, 2
    # 4 more views of 576 features through the projector (input, two outputs, GELU), the packed features twice.
    extra = 4 * 576 * (vd + 3 * d) * e + 2928 * d * e * 2
    assert hd.parts[PROJECTOR] - base.parts[PROJECTOR] == pytest.approx(extra)
    assert hd.parts["vision tower (frozen)"] == base.parts["vision tower (frozen)"]  # same tower, more calls
    assert any("cut into 4 tiles + the base view" in n for n in hd.notes)
    # data.max_tiles 2: only the 1x2 / 2x1 grids, 3 views per image.
    capped = plan(_hd_13b(max_tiles=2)[0], 24, shapes=shapes)
    assert capped.peak < hd.peak and any("cut into 2 tiles" in n and "336x672, 672x336)" in n for n in capped.notes)
    with pytest.raises(PlanError, match="data.max_tiles: no grid resolution has at most 1 tiles"):
        plan(_hd_13b(max_tiles=1)[0], 24, shapes=shapes)
    # A worst-case image that cannot fit data.max_length is said so.
    short = plan(_hd_13b(max_length=2048)[0], 24, shapes=shapes)
    assert any("more than data.max_length 2048" in n for n in short.notes)


def test_13b_hd_qlora_fits_24gb():
    """The issue's question: 13B AnyRes QLoRA (r=128, AdamW, micro-batch 1, 4,096 tokens, the 2x2 grid) on 24 GB."""
    recipe, shapes = _hd_13b()
    p = plan(recipe, 24, shapes=shapes)
    assert p.fits and 22 * GiB < p.needed < 24 * GiB, p.needed / GiB
    assert not plan(recipe, 20, shapes=shapes).fits
    fixes = {o: q for o, q in suggestions(recipe, 20) if q.fits} if HAS_GRID_KEY else {}
    if HAS_GRID_KEY:
        assert fixes and not any("data.max_length" in o for o in fixes)


@pytest.mark.skipif(not HAS_GRID_KEY, reason="needs the model side's model.image_grid_pinpoints key (issue 19 model)")
def test_plan_cli_on_the_hd_recipe(capsys):
    from lora_llava.cli.main import main

    assert main(["plan", str(RECIPES / "llava15_hd_13b.yaml"), "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "verdict: fits" in out and "cut into 4 tiles + the base view" in out
    load_recipe(RECIPES / "llava15_hd_13b.yaml", check_files=False)


def test_llava16_checkpoints_are_known_offline():
    for size in ("7b", "13b"):
        hf = KNOWN_CONFIGS[f"llava-hf/llava-v1.6-vicuna-{size}-hf"]
        assert hf["model_type"] == "llava_next" and hf["text_config"]["vocab_size"] == 32064
        assert hf["image_grid_pinpoints"] == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        assert AnyresGrid.from_config(hf).worst_case == 2928
    # The original layout plans today (read as LLaVA-1.5 + its config's grid); the llava-hf one needs the model side
    # to read llava_next checkpoints.
    raw = yaml.safe_load((RECIPES / "llava16_7b_finetune.yaml").read_text())
    for name in ("liuhaotian/llava-v1.6-vicuna-7b", "llava-hf/llava-v1.6-vicuna-7b-hf"):
        raw["model"]["llava"] = name
        recipe = recipe_from_dict(raw, check_files=False)
        try:
            shapes = shapes_for(recipe)
        except PlanError as e:
            assert name.startswith("llava-hf") and "llava_next" in str(e)
            continue
        assert shapes.grid.pinpoints == tuple(map(tuple, grid_pinpoints(336, ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3)))))
        assert (shapes.hidden, shapes.vocab, shapes.views) == (4096, 32064, 5)
        assert plan(recipe, 24).fits
