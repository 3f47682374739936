"""The original LLaVA (v1): assembled from parts with a linear projector and <im_start>/<im_end>, and loaded from
the v1 release's layout (tests/published_layouts.py ``build_v1``) and its stage-1 ``mm_projector.bin``."""

from __future__ import annotations

import pytest
import torch
from published_layouts import IMAGE, PATCH, build, build_v1

from lora_llava.config.recipe import recipe_from_dict
from lora_llava.errors import ModelError
from lora_llava.model.loading import load_model
from lora_llava.model.stage import build_model

V1 = {"projector_type": "linear", "image_tokens": "start_end"}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    paths = build(root)
    return {**paths, **build_v1(root / "v1", paths["clip_bin"])}


def _recipe(model: dict, bits=16, stage=2):
    raw = {"model": {"attn_implementation": "sdpa", **model}, "quant": {"bits": bits},
           "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}, "data": {"train": "unused.json"},
           "train": {"stage": stage, "output_dir": "unused"}}
    return recipe_from_dict(raw, check_files=False)


def _weights(folder):
    out = {}
    for f in sorted(folder.glob("pytorch_model-*.bin")):
        out.update(torch.load(f, weights_only=True))
    return out


def test_original_v1_checkpoint_loads_row_for_row(published):
    p = published
    model, processor = load_model(_recipe({"llava": str(p["original_v1"]), "vision_tower": str(p["tower"]), **V1}))
    tok = processor.tokenizer
    # <image> takes <im_patch>'s id; <im_start>/<im_end> keep theirs; <pad> comes after.
    assert tok.convert_tokens_to_ids(["<image>", "<im_start>", "<im_end>", "<pad>"]) == [32000, 32001, 32002, 32003]
    assert model.config.image_token_id == 32000 and model.config.projector_hidden_act == "linear"
    saved = _weights(p["original_v1"])
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed.shape[0] == head.shape[0] == 32064
    assert torch.equal(embed[:32003], saved["model.embed_tokens.weight"].float())
    assert torch.equal(head[:32003], saved["lm_head.weight"].float())
    # The rows after the checkpoint's: the mean of its rows, as training makes added rows.
    assert torch.allclose(embed[32003], saved["model.embed_tokens.weight"].float().mean(0), atol=1e-6)
    # pad_token_id -1 of the release is not an embedding padding_idx (that would be <im_end>'s row).
    assert model.get_input_embeddings().padding_idx in (None, 32003)
    proj = model.model.multi_modal_projector
    assert torch.equal(proj.linear_1.weight, saved["model.mm_projector.weight"].float())
    assert torch.equal(proj.linear_1.bias, saved["model.mm_projector.bias"].float())
    assert torch.equal(proj.linear_2.weight, torch.eye(64)) and not proj.linear_2.bias.any()
    # The projector is exactly v1's nn.Linear.
    x = torch.randn(3, 48)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), x @ saved["model.mm_projector.weight"].float().T
                                   + saved["model.mm_projector.bias"].float(), rtol=0, atol=1e-6)


def test_original_v1_needs_the_recipe_to_say_so(published):
    p = published
    with pytest.raises(ModelError, match=r"model.projector_type: 'mlp2x_gelu'.*set model.projector_type: linear"):
        load_model(_recipe({"llava": str(p["original_v1"]), "vision_tower": str(p["tower"])}))
    with pytest.raises(ModelError, match=r"model.image_tokens: 'plain'.*set model.image_tokens: start_end"):
        load_model(_recipe({"llava": str(p["original_v1"]), "vision_tower": str(p["tower"]),
                            "projector_type": "linear"}))
    # And a LLaVA-1.5 checkpoint is not a v1 one.
    with pytest.raises(ModelError, match=r"model.projector_type: 'linear'.*set model.projector_type: mlp2x_gelu"):
        load_model(_recipe({"llava": str(p["original"]), "vision_tower": str(p["tower"]), **V1}))


def test_v1_from_parts_with_the_v1_stage1_file(published):
    """Vicuna + CLIP + v1's mm_projector.bin (projector + whole input embedding): the projector and the last two
    rows of that embedding (<im_start>, <im_end>) are put in; stage 2 trains LoRA, linear_1 and those rows only."""
    p = published
    model, processor = build_model(_recipe({"llm": str(p["vicuna"]), "vision_tower": str(p["clip_bin"]),
                                            "projector": str(p["mm_projector_v1"]), **V1}))
    stage1 = torch.load(p["mm_projector_v1"], weights_only=True)
    base = model.get_base_model()
    assert torch.equal(base.model.multi_modal_projector.linear_1.weight, stage1["model.mm_projector.weight"].float())
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == {
        "base_model.model.model.multi_modal_projector.linear_1.weight",
        "base_model.model.model.multi_modal_projector.linear_1.bias",
        "base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta.default"}
    delta = dict(model.named_parameters())[
        "base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    assert torch.equal(delta, stage1["model.embed_tokens.weight"][-2:].float())
    # What the model computes for <im_start>/<im_end>: those rows; for other tokens the base rows.
    ids = torch.tensor([[1, 32001, 32000, 32002, 450]])
    emb = model.get_input_embeddings()(ids)[0]
    assert torch.equal(emb[1:4:2], stage1["model.embed_tokens.weight"][-2:].float())
    assert torch.equal(emb[4], base.get_input_embeddings().weight[450])
    assert processor.tokenizer.convert_tokens_to_ids(["<im_start>", "<im_end>"]) == [32001, 32002]


def test_v1_rows_need_start_end_tokens(published):
    p = published
    with pytest.raises(ModelError, match="set model.image_tokens: start_end"):
        build_model(_recipe({"llm": str(p["vicuna"]), "vision_tower": str(p["clip_bin"]),
                             "projector": str(p["mm_projector_v1"]), "projector_type": "linear"}))


def test_v1_image_features_are_wrapped(published):
    """One image: <im_start> + N image tokens + <im_end>, the features in between (a forward runs)."""
    p = published
    model, processor = load_model(_recipe({"llm": str(p["vicuna"]), "vision_tower": str(p["clip_bin"]), **V1}))
    from lora_llava.data import encode_prompt, get_template

    n = (IMAGE // PATCH) ** 2
    ids = encode_prompt([("human", "<image>\nWhat is it?")], processor.tokenizer, get_template("llava_v0"), 32000, n)
    at = ids.index(32001)
    assert ids[at:at + n + 2] == [32001] + [32000] * n + [32002]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=torch.rand(1, 3, IMAGE, IMAGE))
    assert out.logits.shape[1] == len(ids)
