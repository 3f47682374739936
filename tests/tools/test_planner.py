"""The memory planner: its activation model against autograd's own bookkeeping, exact parameter counts, the verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_llava.config.recipe import load_recipe, recipe_from_dict
from lora_llava.errors import PlanError
from lora_llava.planner import GiB, Shapes, layer_activation_bytes, lora_params, plan, suggestions

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _saved_bytes(layer, x, position_embeddings) -> int:
    """Bytes of the tensors autograd saves in one forward of ``layer`` (parameters and the input not counted)."""
    owned = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    owned |= {t.untyped_storage().data_ptr() for t in (x, *position_embeddings)}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, position_embeddings=position_embeddings, attention_mask=None)
    return sum(seen.values())


@pytest.mark.parametrize(("lora", "dropout"), [(False, 0.0), (True, 0.0), (True, 0.1)],
                         ids=["stage1", "lora", "lora+dropout"])
def test_activation_model_matches_autograd(lora, dropout):
    """A shape the coefficients were not fitted on (d=384, I=1032, 6 heads, r=16, 300 tokens, bf16)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    d, i, heads, r, tokens = 384, 1032, 6, 16, 300
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=d, intermediate_size=i, num_hidden_layers=1,
                                         num_attention_heads=heads, num_key_value_heads=heads)).to(torch.bfloat16)
    model.requires_grad_(False)
    if lora:
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"])).get_base_model()
    model.train()
    x = torch.randn(1, tokens, d, dtype=torch.bfloat16, requires_grad=True)
    pe = model.model.rotary_emb(x, torch.arange(tokens)[None])
    measured = _saved_bytes(model.model.layers[0], x, pe)
    shapes = Shapes(hidden=d, intermediate=i, layers=1, heads=heads, kv_heads=heads, vocab=128, vision_hidden=8,
                    vision_intermediate=8, vision_layers=1, image_size=8, patch_size=4)
    estimate = layer_activation_bytes(shapes, tokens, 2, lora, dropout > 0, r)
    assert abs(estimate - measured) / measured < 0.10, (estimate, measured)


def test_lora_and_projector_counts_are_exact(make_recipe):
    """The planner's LoRA parameter count equals peft's on a real (tiny) model; the projector's too."""
    from lora_llava.model.stage import build_model

    raw = make_recipe()
    raw["quant"] = {"bits": 16}
    recipe = recipe_from_dict(raw)
    model, _ = build_model(recipe)
    c = model.config
    shapes = Shapes(hidden=c.text_config.hidden_size, intermediate=c.text_config.intermediate_size,
                    layers=c.text_config.num_hidden_layers, heads=c.text_config.num_attention_heads,
                    kv_heads=c.text_config.num_key_value_heads, vocab=c.text_config.vocab_size,
                    vision_hidden=c.vision_config.hidden_size, vision_intermediate=c.vision_config.intermediate_size,
                    vision_layers=c.vision_config.num_hidden_layers, image_size=c.vision_config.image_size,
                    patch_size=c.vision_config.patch_size)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora_params(shapes, recipe.lora.r, recipe.lora.target_modules) == lora
    p = plan(recipe, 24, shapes=shapes)
    projector = sum(p.numel() for n, p in model.named_parameters() if "multi_modal_projector" in n)
    assert p.parts["projector (weights, grads, optimizer)"] == projector * 16  # fp32 weight + grad + AdamW
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
    assert p.parts["vision tower (frozen)"] == pytest.approx(vision * 2, rel=0.01)


@pytest.mark.parametrize("name", ["llava15_7b_pretrain", "llava15_7b", "llava15_13b_pretrain", "llava15_13b"])
def test_shipped_recipes_plan_offline_and_fit_24gb(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml", check_files=False)
    p = plan(recipe, 24, seq_len=650 if "pretrain" in name else None)
    assert p.fits, (name, p.needed / GiB)
    # 13B's NF4 linear weights: ~12.7e9 weights at ~0.516 bytes each.
    if name == "llava15_13b":
        assert 6.0 < p.parts["LLM linear weights (4-bit NF4)"] / GiB < 6.3


def test_knobs_move_the_estimate_the_right_way():
    base = load_recipe(RECIPES / "llava15_7b.yaml", check_files=False)

    def with_(**changes):
        raw = base.to_dict()
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            raw[section][key] = value
        return plan(recipe_from_dict(raw, check_files=False), 24).peak

    peak = plan(base, 24).peak
    assert with_(train__activation_checkpointing=False) > peak + 10 * GiB  # all 32 layers' activations
    assert with_(quant__bits=16) > peak + 8 * GiB  # 6.5e9 linear weights at 2 bytes instead of ~0.52
    assert with_(lora__r=64) < peak
    assert with_(train__optim="paged_adamw_8bit") < peak
    # bf16 trainables (LoRA r=128 on 7B, ~320M parameters, and the projector): 16 -> 8 bytes per parameter (AdamW
    # state in bf16 too).
    parts = plan(base, 24).parts
    trainable = parts["LoRA r=128 (weights, grads, optimizer)"] + parts["projector (weights, grads, optimizer)"]
    assert peak - with_(train__trainable_dtype="bfloat16") == pytest.approx(trainable / 2, rel=1e-6)
    assert with_(train__per_device_train_batch_size=1) < peak


def test_verdict_and_suggestions():
    recipe = load_recipe(RECIPES / "llava15_13b.yaml", check_files=False)
    assert not plan(recipe, 16).fits
    fixes = {o: p for o, p in suggestions(recipe, 16) if p.fits}
    assert fixes and all(p.needed <= 16 * GiB for p in fixes.values())
    assert any("lora.r=64" in o for o in fixes)


def test_unknown_model_shapes_name_the_key(tmp_path):
    recipe = recipe_from_dict({"model": {"llm": "someone/unknown-llm"}, "data": {"train": "x.json"}},
                              check_files=False)
    with pytest.raises(PlanError, match="model.llm: the shapes of 'someone/unknown-llm' are unknown offline"):
        plan(recipe, 24)


def test_plan_cli_exit_codes(capsys):
    from lora_llava.cli.main import main

    def run(*args):
        code = main(["plan", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = run(str(RECIPES / "llava15_7b.yaml"), "--gpu-memory", "24")
    assert code == 0 and "LoRA r=128" in out and "verdict: fits" in out
    code, out, _ = run(str(RECIPES / "llava15_7b.yaml"), "--gpu-memory", "12")
    assert code == 1 and "does not fit" in out and "would make it fit" in out
    code, out, _ = run(str(RECIPES / "llava15_13b.yaml"), "--gpu-memory", "4")
    assert code == 1 and "a larger GPU" in out
    # Through the real console entry point once: a bad key is exit 2 with the key named.
    bad = subprocess.run([sys.executable, "-m", "lora_llava", "plan", str(RECIPES / "llava15_7b.yaml"), "lora.rr=3"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "lora.rr" in bad.stderr


@pytest.mark.parametrize("args, message", [
    (["--seq-len", "-100"], "--seq-len: must be at least 1, got -100"),
    (["--seq-len", "0"], "--seq-len: must be at least 1, got 0"),
    (["--gpu-memory", "-5"], "--gpu-memory: must be a positive number, got -5"),
    (["--gpu-memory", "0"], "--gpu-memory: must be a positive number, got 0"),
    (["--gpu-memory", "nan"], "--gpu-memory: must be a positive number, got nan"),
])
def test_plan_refuses_numbers_that_mean_nothing(args, message, capsys):
    """A negative or zero length or GPU size was accepted (a smaller estimate that "fits", or silently 2048)."""
    from lora_llava.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(RECIPES / "llava15_7b.yaml"), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_plan_names_a_broken_or_foreign_checkpoint(tmp_path, capsys):
    """A broken config.json is named with its line (not "could not be loaded from the Hub"); a Llama folder given as
    model.llava is named as such (it was a TypeError)."""
    from lora_llava.cli.main import main

    broken, llama = tmp_path / "broken", tmp_path / "llama"
    broken.mkdir()
    llama.mkdir()
    (broken / "config.json").write_text('{"model_type": "llava",\n  oops}')
    (llama / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    assert main(["plan", str(RECIPES / "llava15_7b.yaml"), f"model.llava={broken}", "model.llm=null",
                 "model.projector=null"]) == 2
    err = capsys.readouterr().err
    assert f"model.llava: {broken / 'config.json'}: not valid JSON" in err and "line 2" in err and "Hub" not in err
    assert main(["plan", str(RECIPES / "llava15_7b.yaml"), f"model.llava={llama}", "model.llm=null",
                 "model.projector=null"]) == 2
    assert f"model.llava: '{llama}' is a 'llama' checkpoint, not a LLaVA" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["llava_v1_7b_pretrain", "llava_v1_7b", "llava_v1_13b_pretrain", "llava_v1_13b"])
def test_v1_recipes_plan_offline_with_256_image_tokens(name):
    """The LLaVA v1 recipes: CLIP-L/14 at 224 px (256 image tokens) and the LLaMA-1 Vicunas are known offline."""
    from lora_llava.planner import shapes_for

    recipe = load_recipe(RECIPES / f"{name}.yaml", check_files=False)
    shapes = shapes_for(recipe)
    assert (shapes.image_size, shapes.patch_size, shapes.image_tokens) == (224, 14, 256)
    assert shapes.hidden == (5120 if "13b" in name else 4096) and shapes.vocab == 32064
    p = plan(recipe, 24, seq_len=400 if "pretrain" in name else None)
    assert p.fits, (name, p.needed / GiB)
