"""GPU checks (marker ``gpu``; skipped without CUDA): the QLoRA path in bf16 on the GPU, flash-attn padding-free.

They have not run on a GPU yet (none was lent to this project); run them with ``python -m pytest -m gpu``.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from lora_llava.config.recipe import recipe_from_dict

pytestmark = pytest.mark.gpu


def _gpu_recipe(make_recipe, **train):
    return make_recipe(model={"dtype": "bfloat16", "attn_implementation": "sdpa"}, train={"max_steps": 8, **train})


def test_qlora_trains_on_the_gpu_in_bf16(make_recipe):
    from lora_llava.train.sft import train

    result = train(recipe_from_dict(_gpu_recipe(make_recipe)))
    assert result.losses[-1] < result.losses[0]
    model = result.model
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert next(p for n, p in model.named_parameters() if "vision_tower" in n).dtype == torch.bfloat16
    info = json.loads((result.output_dir / "run_info.json").read_text())
    assert info["peak_gpu_memory_bytes"] > 0 and info["gpu"] == torch.cuda.get_device_name()


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_padding_free_loss_equals_padded_sdpa(make_recipe):
    """The same batch, padded with sdpa and flattened with flash-attn varlen: the same loss (bf16 tolerance)."""
    from lora_llava.data import LlavaCollator
    from lora_llava.model.stage import build_model
    from lora_llava.train.sft import answer_only_loss, build_datasets

    losses = {}
    for attn, padding_free in (("sdpa", False), ("flash_attention_2", True)):
        raw = _gpu_recipe(make_recipe)
        raw["model"]["attn_implementation"] = attn
        raw["lora"]["lora_dropout"] = 0.0
        recipe = recipe_from_dict(raw)
        torch.manual_seed(0)
        model, processor = build_model(recipe)
        train_ds, _ = build_datasets(recipe, processor, model.config)
        collator = LlavaCollator(processor.image_processor, processor.tokenizer.pad_token_id,
                                 recipe.data.image_folder, padding_free=padding_free)
        batch = collator([train_ds[i] for i in range(4)])
        batch = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            losses[attn] = float(answer_only_loss(model, batch)[0])
    assert losses["flash_attention_2"] == pytest.approx(losses["sdpa"], rel=2e-2)
