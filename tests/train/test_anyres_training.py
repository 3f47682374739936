"""Training wiring for AnyRes (LLaVA-NeXT) models: the grid read from the model config, ``data.max_tiles`` applied to
the model and the processor alike, per-sample image tokens, and the trainer stepping a tiny LlavaNext with LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tiny_next import TILE, tiny_next

from lora_llava.config.recipe import recipe_from_dict
from lora_llava.errors import RecipeError
from lora_llava.llava.anyres import AnyresGrid
from lora_llava.llava.constants import IMAGE_TOKEN
from lora_llava.llava.tokenizer import image_token_id, load_tokenizer

SIZES = [(32, 32), (64, 64), (40, 90), (90, 40), (64, 60), (33, 70), (70, 33), (50, 50)]


def _tiny_next():
    return tiny_next(load_tokenizer())


@pytest.fixture
def hd_data(tmp_path):
    records = []
    for k, (h, w) in enumerate(SIZES):
        colour = ("red", "blue")[k % 2]
        Image.new("RGB", (w, h), (220, 30, 30) if colour == "red" else (30, 30, 220)).save(tmp_path / f"im{k}.png")
        records.append({"id": f"r{k}", "image": f"im{k}.png",
                        "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                                          {"from": "gpt", "value": colour}]})
    (tmp_path / "train.json").write_text(json.dumps(records))
    return tmp_path


def _recipe(make_recipe, hd_data, **data):
    return recipe_from_dict(make_recipe(quant={"bits": 16}, data={"train": str(hd_data / "train.json"),
                                                                  "image_folder": str(hd_data), **data},
                                        train={"max_steps": 3, "per_device_train_batch_size": 4}))


def test_max_tiles_caps_model_and_processor_and_the_counts(make_recipe, hd_data):
    from lora_llava.train.sft import apply_max_tiles, build_datasets

    model, processor = _tiny_next()
    recipe = _recipe(make_recipe, hd_data, max_tiles=2)
    grid = apply_max_tiles(recipe, model.config, processor)
    assert grid.max_tiles == 2 and grid.pinpoints == ((TILE, 2 * TILE), (2 * TILE, TILE))
    assert model.config.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints == \
        [[TILE, 2 * TILE], [2 * TILE, TILE]]
    train_ds, _ = build_datasets(recipe, processor, model.config)
    # The 64 x 64 image: 88 tokens on the 2x2 grid, fewer on the capped one; the processor agrees.
    assert train_ds[1]["image_tokens"] == [grid.tokens(64, 64)] and grid.tokens(64, 64) < 88
    out = processor(images=[Image.open(hd_data / "im1.png").convert("RGB")], text=[f"{IMAGE_TOKEN}\nhi"],
                    return_tensors="pt")
    assert int((out["input_ids"] == image_token_id(processor.tokenizer)).sum()) == grid.tokens(64, 64)
    assert out["pixel_values"].shape[1] == 1 + 2
    # The model cuts by the same capped grid: a collated batch of a 2x2-sized image runs through it.
    from lora_llava.data import LlavaCollator

    batch = LlavaCollator(processor.image_processor, processor.tokenizer.pad_token_id, str(hd_data),
                          grid=grid)([train_ds[k] for k in range(3)])
    assert batch["pixel_values"].shape[1] == 3
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)

    with pytest.raises(RecipeError, match="data.max_tiles: no grid resolution has at most 1 tiles"):
        apply_max_tiles(_recipe(make_recipe, hd_data, max_tiles=1), _tiny_next()[0].config)
    with pytest.raises(RecipeError, match="data.max_tiles: must be at least 1"):
        _recipe(make_recipe, hd_data, max_tiles=0)
    # A LLaVA-1.5 model has no grid to cap.
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    plain = LlavaConfig(vision_config=CLIPVisionConfig(image_size=32, patch_size=8), text_config=LlamaConfig())
    assert AnyresGrid.from_config(plain) is None
    with pytest.raises(RecipeError, match="data.max_tiles: 2, but the model has no AnyRes grid"):
        apply_max_tiles(recipe, plain)


def test_trainer_steps_a_tiny_llava_next_with_lora(make_recipe, hd_data):
    """build_datasets + build_trainer on a LlavaNext model (LoRA on the LLM, trainable projector): image_sizes reach
    the model, mixed tile counts batch, the loss is finite, the projector and LoRA move, the base does not."""
    from peft import LoraConfig, get_peft_model

    from lora_llava.train.sft import build_datasets
    from lora_llava.train.trainer import build_trainer

    model, processor = _tiny_next()
    recipe = _recipe(make_recipe, hd_data)
    train_ds, _ = build_datasets(recipe, processor, model.config)
    assert len({tuple(r["image_tokens"]) for r in train_ds.to_hf()}) >= 4
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    for n, p in model.named_parameters():
        if "multi_modal_projector" in n:
            p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = build_trainer(recipe, model, processor, train_ds.to_hf())
    assert trainer.data_collator.grid == AnyresGrid.from_config(model.config)
    batch = trainer.data_collator([train_ds[k] for k in range(4)])
    assert "image_sizes" in batch and batch["pixel_values"].shape[:2] == (4, 5)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert any("multi_modal_projector" in n for n in changed) and any("lora_" in n for n in changed)
    assert not any("vision_tower" in n or ("lora_" not in n and "language_model" in n) for n in changed)


def test_train_end_to_end_on_a_next_checkpoint_with_max_tiles(make_recipe, hd_data, tmp_path):
    """`train()` on a tiny llava-next-hf checkpoint with data.max_tiles: 2: the cap is written into the run's recipe
    as model.image_grid_pinpoints (what merge and inference rebuild from) and into its processor; the data's counts
    and the model's grid follow it; the loss falls."""
    from transformers import AutoProcessor

    from lora_llava.config.recipe import load_recipe
    from lora_llava.demo import make_demo_model
    from lora_llava.llava.spec import ModelSpec
    from lora_llava.run.folder import RunFolder
    from lora_llava.train.sft import train

    model_dir = make_demo_model(tmp_path / "next", image_size=TILE, hidden_size=64, anyres=True)
    raw = make_recipe(model={"llava": str(model_dir), "attn_implementation": "sdpa"}, quant={"bits": 4},
                      data={"train": str(hd_data / "train.json"), "image_folder": str(hd_data), "max_tiles": 2},
                      train={"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 2e-2})
    raw["train"]["output_dir"] = str(tmp_path / "run")
    result = train(recipe_from_dict(raw))
    capped = [[TILE, 2 * TILE], [2 * TILE, TILE]]
    assert result.model.config.image_grid_pinpoints == capped
    assert result.losses[-1] < result.losses[0]
    run = RunFolder(tmp_path / "run")
    saved = load_recipe(run.path / "recipe.yaml", check_files=False)
    assert saved.model.image_grid_pinpoints == capped and saved.data.max_tiles == 2
    assert [list(p) for p in ModelSpec.from_recipe(saved).pinpoints] == capped
    assert AutoProcessor.from_pretrained(str(run.processor_dir)).image_processor.image_grid_pinpoints == capped
    with pytest.raises(RecipeError, match="data.max_tiles: 2, but the model has no AnyRes grid"):
        from lora_llava.train.sft import resolve_max_tiles

        resolve_max_tiles(recipe_from_dict(make_recipe(data={"max_tiles": 2})))
