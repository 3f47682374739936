"""The three ways to a model: from parts (Llama + CLIP), llava-hf, original LLaVA; each checkpoint saved by the test."""

from __future__ import annotations

import json
import sys

import bitsandbytes as bnb
import datasets
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_llava.config.recipe import recipe_from_dict
from lora_llava.errors import ModelError
from lora_llava.model.loading import load_model
from lora_llava.model.runtime import quantization_config
from lora_llava.model.stage import build_model

IMAGE = 32


@pytest.fixture(scope="module")
def parts(tmp_path_factory, vicuna_tokenizer):
    """{llm, clip, hf, original}: one tiny set of weights saved in all three layouts."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    root = tmp_path_factory.mktemp("layouts")
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                       initializer_range=0.1))
    llm.save_pretrained(root / "llm")
    vicuna_tokenizer.save_pretrained(root / "llm")  # plain Vicuna vocabulary: no <image>, no pad
    # A full CLIP checkpoint (text + vision), like openai/clip-vit-large-patch14-336.
    clip = CLIPModel(CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
                       "image_size": IMAGE, "patch_size": 8},
        projection_dim=32))
    clip.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(
        root / "clip")

    # llava-hf: assembled from the parts, projector set to random values, saved the llava-hf way.
    model, processor = load_model(_recipe(root, llm=str(root / "llm"), vision_tower=str(root / "clip")))
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(root / "hf")
    processor.save_pretrained(root / "hf")

    # Original LLaVA: the Llama keys + model.mm_projector.0/.2, a llava_llama config naming the vision tower.
    weights = load_file(str(next((root / "llm").glob("*.safetensors"))))
    proj = model.model.multi_modal_projector
    for i, layer in ((0, proj.linear_1), (2, proj.linear_2)):
        weights.update({f"model.mm_projector.{i}.weight": layer.weight, f"model.mm_projector.{i}.bias": layer.bias})
    (root / "original").mkdir()
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(root / "original" / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((root / "llm" / "config.json").read_text())
    config.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_vision_tower=str(root / "clip"),
                  mm_hidden_size=48, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", mm_use_im_start_end=False, mm_use_im_patch_token=False,
                  image_aspect_ratio="pad", mm_patch_merge_type="flat", tune_mm_mlp_adapter=False)
    (root / "original" / "config.json").write_text(json.dumps(config))
    vicuna_tokenizer.save_pretrained(root / "original")
    return {"root": root, "llm": root / "llm", "clip": root / "clip", "hf": root / "hf", "original": root / "original",
            "llm_model": llm, "clip_model": clip}


def _recipe(root, bits=16, stage=2, **model):
    return recipe_from_dict({
        "model": {"attn_implementation": "sdpa", **model},
        "quant": {"bits": bits},
        "lora": {"r": 4, "lora_alpha": 8},
        "data": {"train": "unused.json"},
        "train": {"stage": stage, "output_dir": str(root / "run")},
    }, check_files=False)


def _inputs(processor):
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    pixels = torch.rand(1, 3, IMAGE, IMAGE)
    ids = processor.tokenizer(prompt, return_tensors="pt").input_ids
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    n = (IMAGE // 8) ** 2
    pos = (ids[0] == image_id).nonzero()[0, 0]
    ids = torch.cat([ids[:, :pos], torch.full((1, n), image_id), ids[:, pos + 1:]], dim=1)
    return ids, pixels


def _by_layout(parts):
    return {
        "parts": {"llm": str(parts["llm"]), "vision_tower": str(parts["clip"])},
        "llava-hf": {"llava": str(parts["hf"])},
        "original": {"llava": str(parts["original"])},
    }


def test_three_layouts_give_the_same_model(parts):
    loaded = {name: load_model(_recipe(parts["root"], **m)) for name, m in _by_layout(parts).items()}
    shapes = {name: {n: tuple(p.shape) for n, p in model.named_parameters()} for name, (model, _) in loaded.items()}
    assert shapes["parts"] == shapes["llava-hf"] == shapes["original"]
    for name, (model, processor) in loaded.items():
        tok = processor.tokenizer
        assert tok.convert_tokens_to_ids("<image>") == 32000 and tok.pad_token_id == 32001, name
        assert model.get_input_embeddings().weight.shape[0] == 32064, name  # padded to a multiple of 64
        assert model.config.text_config.vocab_size == 32064
        c = model.config
        assert (c.vision_feature_layer, c.vision_feature_select_strategy, c.image_token_id) == (-2, "default", 32000)
        assert c.projector_hidden_act == "gelu" and c.image_seq_length == (IMAGE // 8) ** 2
        assert processor.image_processor.crop_size == {"height": IMAGE, "width": IMAGE}
    # The LLM's and CLIP's own weights arrive untouched.
    model = loaded["parts"][0]
    q = model.model.language_model.layers[1].self_attn.q_proj.weight
    assert torch.equal(q, parts["llm_model"].model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(model.lm_head.weight[:32000], parts["llm_model"].lm_head.weight)
    clip_fc = parts["clip_model"].vision_model.encoder.layers[2].mlp.fc1.weight
    assert torch.equal(model.model.vision_tower.encoder.layers[2].mlp.fc1.weight, clip_fc)
    # Same weights, same logits, over the whole vocabulary: the rows added for <image> and <pad> are the
    # deterministic mean of the base rows on every load path.
    ids, pixels = _inputs(loaded["llava-hf"][1])
    logits = {}
    for name, (model, _) in loaded.items():
        if name == "parts":
            continue  # its projector is fresh; the saved layouts hold the randomised one
        with torch.no_grad():
            logits[name] = model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(logits["original"], logits["llava-hf"], rtol=0, atol=1e-5)


def test_parts_with_a_fresh_projector_is_initialised_like_nn_linear(parts):
    model, _ = load_model(_recipe(parts["root"], llm=str(parts["llm"]), vision_tower=str(parts["clip"])))
    w = model.model.multi_modal_projector.linear_1.weight
    bound = 1 / 48**0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert model.model.multi_modal_projector.linear_1.bias.abs().max() > 0


@pytest.mark.parametrize("layout", ["parts", "original"])
def test_four_bit_quantizes_exactly_the_llm_linears(parts, layout):
    model, _ = load_model(_recipe(parts["root"], bits=4, **_by_layout(parts)[layout]))
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    expected = {f"model.language_model.layers.{i}.{kind}" for i in range(2)
                for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert four_bit == expected
    assert not any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())


def test_stage1_four_bit_trains_only_the_projector(parts):
    """Stage 1 on a 4-bit LLM: no LoRA layers, one optimizer step moves the projector and nothing else."""
    model, processor = build_model(_recipe(parts["root"], bits=4, stage=1, llava=str(parts["hf"])))
    trainable = {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.multi_modal_projector.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    assert not any("lora_" in n for n, _ in model.named_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, pixels = _inputs(processor)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
    opt.step()
    changed = {n.removeprefix("base_model.model.") for n, p in model.named_parameters()
               if not torch.equal(p.detach(), before[n])}
    assert changed == trainable


def test_wrong_kind_of_checkpoint_is_named(parts):
    root = parts["root"]
    with pytest.raises(ModelError, match=r"model.llm: '.*clip' is a 'clip' checkpoint, not a Llama"):
        load_model(_recipe(root, llm=str(parts["clip"])))
    with pytest.raises(ModelError, match=r"model.llm: '.*hf' is a 'llava' checkpoint.*set it as model.llava"):
        load_model(_recipe(root, llm=str(parts["hf"])))
    with pytest.raises(ModelError, match=r"model.vision_tower: '.*llm' is a 'llama' checkpoint, not a CLIP"):
        load_model(_recipe(root, llm=str(parts["llm"]), vision_tower=str(parts["llm"])))
    with pytest.raises(ModelError, match=r"model.llava: '.*llm' is a 'llama' checkpoint, not a LLaVA"):
        load_model(_recipe(root, llava=str(parts["llm"])))
    with pytest.raises(ModelError, match=r"model.vision_tower: '.*hf' is a llava-hf checkpoint that brings its own"):
        load_model(_recipe(root, llava=str(parts["hf"]), vision_tower=str(parts["clip"])))
    with pytest.raises(ModelError, match=r"model.llm: '.*nowhere' does not exist"):
        load_model(_recipe(root, llm=str(root / "nowhere")))


def test_projector_shapes_from_configs_match_the_loaded_models(parts):
    """The shapes a stage-2 projector is checked against come from config files alone, for all three layouts."""
    from lora_llava.llava.spec import ModelSpec

    for kwargs in ({"llava": str(parts["hf"])}, {"llava": str(parts["original"])},
                   {"llm": str(parts["llm"]), "vision_tower": str(parts["clip"])}):
        recipe = _recipe(parts["root"], **kwargs)
        model, _ = load_model(recipe)
        state = model.model.multi_modal_projector.state_dict()
        assert ModelSpec.from_recipe(recipe).projector_shapes() == {k: tuple(v.shape) for k, v in state.items()}, kwargs
        assert ModelSpec.from_recipe(recipe).projector_shapes()["linear_1.weight"] == (64, 48)


def test_original_checkpoint_problems_are_named(parts, tmp_path):
    import shutil

    bad = tmp_path / "linear"
    shutil.copytree(parts["original"], bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    # A linear projector (LLaVA v1) loads when the recipe says so (tests/model/test_llava_v1.py); unsaid, it is named.
    with pytest.raises(ModelError, match="has mm_projector_type 'linear'; set model.projector_type: linear"):
        load_model(_recipe(tmp_path, llava=str(bad)))
    (bad / "config.json").write_text(json.dumps({**config, "mm_projector_type": "mlp3x_gelu"}))
    with pytest.raises(ModelError, match="mm_projector_type 'mlp3x_gelu'; lora-llava reads mlp2x_gelu"):
        load_model(_recipe(tmp_path, llava=str(bad)))
    # A checkpoint with fewer layers than its config says: the missing weights are named.
    (bad / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ModelError, match=r"model.llava: '.*linear' lacks \d+ weights .*layers\.2\."):
        load_model(_recipe(tmp_path, llava=str(bad)))


def test_four_bit_without_bitsandbytes_is_a_clear_error(parts, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as on a broken install
    with pytest.raises(ModelError, match="quant.bits: 4 needs a working bitsandbytes.*set quant.bits: 16"):
        quantization_config(_recipe(parts["root"], bits=4, llava=str(parts["hf"])), torch.float32)


def test_bf16_model_is_not_upcast_for_training(parts):
    """Preparing a 4-bit model for training keeps frozen weights in bf16; only trainable weights become fp32."""
    from lora_llava.train.sft import sft_config
    from lora_llava.train.trainer import build_trainer

    raw = _recipe(parts["root"], bits=4, llava=str(parts["hf"]), dtype="bfloat16").to_dict()
    raw["train"]["use_cpu"] = True  # bf16 mixed precision on a machine without a GPU
    recipe = recipe_from_dict(raw, check_files=False)
    model, processor = build_model(recipe)
    trainer = build_trainer(recipe, model, processor, datasets.Dataset.from_list([{"x": 1}]),
                            args=sft_config(recipe, torch.bfloat16), collator=lambda rows: rows)
    frozen = {n: p.dtype for n, p in trainer.model.named_parameters()
              if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen and set(frozen.values()) == {torch.bfloat16}, {d for d in frozen.values()}
    assert any("vision_tower" in n for n in frozen) and any("lm_head" in n for n in frozen)


def test_parts_stage1_then_stage2_through_the_trainer(parts, shapes_data, tmp_path):
    """From parts: stage 1 on a 4-bit LLM trains a fresh projector; stage 2 starts from it and adds LoRA."""
    from lora_llava.train.sft import train

    folder, train_json, _ = shapes_data
    common = {"llm": str(parts["llm"]), "vision_tower": str(parts["clip"]), "attn_implementation": "sdpa"}
    stage1 = train(recipe_from_dict({
        "model": common, "quant": {"bits": 4},
        "data": {"train": str(train_json), "image_folder": str(folder), "max_length": 128},
        "train": {"stage": 1, "output_dir": str(tmp_path / "s1"), "max_steps": 3, "per_device_train_batch_size": 4,
                  "learning_rate": 1e-2, "warmup_steps": 0},
    }))
    assert stage1.summary["lora"] == 0 and stage1.summary["quantized_modules"] == 14
    assert stage1.summary["trainable"] == stage1.summary["projector"]
    assert not (stage1.output_dir / "adapter").exists()
    saved = load_file(str(stage1.output_dir / "projector.safetensors"))
    stage2 = train(recipe_from_dict({
        "model": {**common, "projector": str(stage1.output_dir)}, "quant": {"bits": 4},
        "lora": {"r": 4, "lora_alpha": 8},
        "data": {"train": str(train_json), "image_folder": str(folder), "max_length": 256},
        "train": {"stage": 2, "output_dir": str(tmp_path / "s2"), "max_steps": 1, "per_device_train_batch_size": 4,
                  "learning_rate": 0.0, "projector_lr": 0.0, "warmup_steps": 0},
    }))
    # lr 0: the projector stage 2 saved is exactly the one stage 1 produced.
    again = load_file(str(stage2.output_dir / "projector.safetensors"))
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    assert stage2.summary["lora"] > 0 and (stage2.output_dir / "adapter" / "adapter_model.safetensors").is_file()
    tok = stage2.processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == 32000 and tok.pad_token_id == 32001
