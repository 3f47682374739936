"""Model assembly: what is quantized, what trains in each stage, the projector's learning rate."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from lora_llava.config.recipe import recipe_from_dict
from lora_llava.errors import ModelError, RecipeError
from lora_llava.model.runtime import choose_attention
from lora_llava.model.stage import build_model, model_summary


def test_only_language_model_linears_are_4bit(make_recipe):
    model, _ = build_model(recipe_from_dict(make_recipe()))
    four_bit = sorted(n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    assert four_bit, "nothing was quantized"
    assert all(".language_model.layers." in n for n in four_bit)
    # 2 layers x (q, k, v, o, gate, up, down)
    assert len(four_bit) == 14
    for n, m in model.named_modules():
        if "vision_tower" in n or "multi_modal_projector" in n or n.endswith("lm_head"):
            assert not isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)), n
    assert model_summary(model)["quantized_modules"] == 14


def test_stage2_trainable_set_is_lora_and_projector(make_recipe):
    model, _ = build_model(recipe_from_dict(make_recipe()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    projector = {n for n in trainable if "multi_modal_projector" in n}
    assert trainable == lora | projector
    assert len(projector) == 4  # linear_1/2 weight + bias
    assert all(".language_model.layers." in n for n in lora)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_stage1_trains_only_the_projector(make_recipe):
    raw = make_recipe()
    raw["train"]["stage"] = 1
    raw["quant"] = {"bits": 16}
    model, _ = build_model(recipe_from_dict(raw))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias",
                         "model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias"}
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_sixteen_bit_means_no_quantization(make_recipe):
    raw = make_recipe()
    raw["quant"] = {"bits": 16}
    model, _ = build_model(recipe_from_dict(raw))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_lora_targets_outside_language_model_refused(make_recipe):
    raw = make_recipe()
    raw["lora"]["target_modules"] = ["q_proj", "fc1"]
    with pytest.raises(ModelError, match=r"lora.target_modules: \['fc1'\]"):
        build_model(recipe_from_dict(raw))


def test_missing_checkpoint_is_named(make_recipe, tmp_path):
    raw = make_recipe()
    raw["model"]["llava"] = str(tmp_path / "nowhere")
    with pytest.raises(RecipeError, match=r"model.llava: '.*nowhere' does not exist"):  # found by the recipe check
        recipe_from_dict(raw)
    with pytest.raises(ModelError, match=r"model.llava: '.*nowhere' does not exist"):  # and by the loader
        build_model(recipe_from_dict(raw, check_files=False))
    (tmp_path / "empty").mkdir()
    raw["model"]["llava"] = str(tmp_path / "empty")
    with pytest.raises(ModelError, match="has no config.json"):
        build_model(recipe_from_dict(raw))
    # Looks like a Hub id, is not on disk, and the Hub is out of reach (HF_HUB_OFFLINE in the tests).
    raw["model"]["llava"] = "nobody-here/no-such-model"
    with pytest.raises(ModelError, match="model.llava: 'nobody-here/no-such-model' is not a local folder"):
        build_model(recipe_from_dict(raw))


def test_flash_attention_without_flash_attn_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU machine may have flash-attn")
    with pytest.raises(ModelError, match="flash_attention_2 asked but"):
        choose_attention("flash_attention_2")
    assert choose_attention("auto") == "sdpa"


def test_trainable_dtype_bfloat16_keeps_lora_and_projector_in_bf16_through_the_trainer(make_recipe):
    """train.trainable_dtype: bfloat16 (half the memory of LoRA, projector and their optimizer state) holds through
    TRL's setup; frozen bf16 weights stay bf16; a float32 model refuses it at recipe time."""
    from lora_llava.errors import RecipeError
    from lora_llava.train.sft import build_datasets, sft_config
    from lora_llava.train.trainer import build_trainer

    raw = make_recipe()
    raw["model"]["dtype"] = "bfloat16"
    raw["train"].update(trainable_dtype="bfloat16", use_cpu=True, max_steps=2)
    recipe = recipe_from_dict(raw)
    model, processor = build_model(recipe)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable.values())
    before = {n: p.detach().clone() for n, p in trainable.items() if "lora_B" in n or "linear_2" in n}
    train_ds, _ = build_datasets(recipe, processor, model.config)
    from lora_llava.data import LlavaCollator

    trainer = build_trainer(recipe, model, processor, train_ds.to_hf(), args=sft_config(recipe, torch.bfloat16),
                            collator=LlavaCollator(processor.image_processor, processor.tokenizer.pad_token_id,
                                                   recipe.data.image_folder))
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(after[n].dtype == torch.bfloat16 for n in trainable)
    assert all(not torch.equal(after[n].detach(), v) for n, v in before.items())  # they trained
    assert next(p for n, p in after.items() if "vision_tower" in n).dtype == torch.bfloat16

    raw["model"]["dtype"] = "float32"
    with pytest.raises(RecipeError, match="train.trainable_dtype: bfloat16 needs model.dtype bfloat16"):
        recipe_from_dict(raw)
    if not torch.cuda.is_available():  # auto = fp32 on the CPU: refused when the model is built, not mid-step
        raw["model"]["dtype"] = "auto"
        with pytest.raises(ModelError, match="train.trainable_dtype: bfloat16 needs a bf16 model, but model.dtype "
                                             "'auto' gave float32 here"):
            build_model(recipe_from_dict(raw))
