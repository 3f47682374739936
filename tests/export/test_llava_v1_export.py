"""The original LLaVA (v1) end to end on tiny checkpoints: Vicuna + CLIP from parts with a linear projector and
<im_start>/<im_end> -> stage 1 on a 4-bit base (only linear_1 and the two new input rows change) -> stage 2 from the
stage-1 run (LoRA + linear_1 + the rows) -> merge into the hf and the original layouts, whose logits equal the
trained model's and whose processor reproduces training's ids."""

from __future__ import annotations

import json

import pytest
import torch
from published_layouts import IMAGE, PATCH, build
from safetensors import safe_open
from safetensors.torch import load_file

from lora_llava.config.recipe import recipe_from_dict
from lora_llava.data import encode_prompt, get_template
from lora_llava.export.merge import merge
from lora_llava.model.loading import load_model
from lora_llava.model.stage import build_model
from lora_llava.train.sft import train

ROWS = "base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta.default"
N = (IMAGE // PATCH) ** 2


def _recipe(parts: dict, data: dict, out, stage: int, bits: int, **model) -> object:
    raw = {"model": {**parts, "projector_type": "linear", "image_tokens": "start_end", "attn_implementation": "sdpa",
                     **model},
           "quant": {"bits": bits}, "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
           "data": {**data, "template": "llava_v0", "image_aspect_ratio": "resize", "max_length": 256},
           "train": {"stage": stage, "output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": 4,
                     "learning_rate": 2e-2, "projector_lr": 2e-2, "warmup_steps": 0, "logging_steps": 1}}
    return recipe_from_dict(raw)


@pytest.fixture(scope="module")
def v1(tmp_path_factory, shapes_data):
    from transformers import set_seed

    root = tmp_path_factory.mktemp("v1")
    p = build(root / "published")
    folder, train_json, _ = shapes_data
    parts = {"llm": str(p["vicuna"]), "vision_tower": str(p["clip_bin"])}
    data = {"train": str(train_json), "image_folder": str(folder)}
    r1 = _recipe(parts, data, root / "s1", stage=1, bits=4)
    set_seed(r1.train.seed)  # as train() does before it builds the model: the same fresh projector
    before = {n: q.detach().clone() for n, q in build_model(r1)[0].named_parameters()}
    s1 = train(r1)
    r2 = _recipe(parts, data, root / "s2", stage=2, bits=16, projector=str(s1.output_dir))
    start2 = {n: q.detach().clone() for n, q in build_model(r2)[0].named_parameters()}
    s2 = train(r2)
    return {"s1": s1, "s2": s2, "before": before, "start2": start2, "root": root, "parts": parts, "data": data}


def test_stage1_trains_the_projector_and_the_two_rows_only(v1):
    s1, before = v1["s1"], v1["before"]
    after = dict(s1.model.named_parameters())
    assert set(after) == set(before)
    changed = {n for n in after if not torch.equal(after[n].detach(), before[n])}
    assert changed == {"base_model.model.model.multi_modal_projector.linear_1.weight",
                       "base_model.model.model.multi_modal_projector.linear_1.bias", ROWS}
    assert any(q.dtype == torch.uint8 for q in after.values())  # the base was 4-bit (QLoRA) and did not change
    # The rows started at the mean of the base rows (for <im_start> and <im_end> alike).
    assert torch.equal(before[ROWS][0], before[ROWS][1])
    # The stage-1 artefact holds the projector and the rows, with their ids.
    saved = load_file(str(s1.output_dir / "projector.safetensors"))
    assert saved["embed_tokens.ids"].tolist() == [32001, 32002]
    assert torch.equal(saved["embed_tokens.rows"], after[ROWS].detach().float())
    assert torch.equal(saved["multi_modal_projector.linear_1.weight"],
                       after["base_model.model.model.multi_modal_projector.linear_1.weight"].detach().float())
    assert torch.equal(saved["multi_modal_projector.linear_2.weight"], torch.eye(64))
    assert not (s1.output_dir / "adapter").exists() or not any((s1.output_dir / "adapter").iterdir())


def test_stage2_starts_from_stage1_and_trains_lora_projector_rows(v1):
    s1, s2, start = v1["s1"], v1["s2"], v1["start2"]
    saved = load_file(str(s1.output_dir / "projector.safetensors"))
    assert torch.equal(start[ROWS], saved["embed_tokens.rows"])
    assert torch.equal(start["base_model.model.model.multi_modal_projector.linear_1.weight"],
                       saved["multi_modal_projector.linear_1.weight"])
    after = dict(s2.model.named_parameters())
    trainable = {n for n, q in after.items() if q.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == {
        "base_model.model.model.multi_modal_projector.linear_1.weight",
        "base_model.model.model.multi_modal_projector.linear_1.bias", ROWS}
    changed = {n for n in after if not torch.equal(after[n].detach(), start[n])}
    assert ROWS in changed and "base_model.model.model.multi_modal_projector.linear_1.weight" in changed
    assert any("lora_B" in n for n in changed)
    assert not [n for n in changed if "lora_" not in n and n not in trainable]  # nothing frozen moved
    assert s2.losses[-1] < s2.losses[0]


def _conversation_ids(tokenizer, turns):
    return encode_prompt(turns, tokenizer, get_template("llava_v0"), 32000, N)


def _logits(model, ids, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=torch.rand(1, 3, IMAGE, IMAGE, generator=g),
                     use_cache=False).logits.float()


def test_hf_export_is_the_trained_v1_model(v1):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    s2 = v1["s2"]
    out = merge(s2.output_dir, v1["root"] / "hf", dtype="fp32", progress=False).out
    model = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()  # no code of ours
    processor = AutoProcessor.from_pretrained(str(out))
    assert model.config.projector_hidden_act == "linear"
    proj = model.model.multi_modal_projector
    assert torch.equal(proj.linear_2.weight, torch.eye(64)) and not proj.linear_2.bias.any()
    rows = dict(s2.model.named_parameters())[ROWS].detach()
    assert torch.equal(model.get_input_embeddings().weight[32001:32003], rows)
    ids = _conversation_ids(s2.processor.tokenizer, [("human", "<image>\nWhat shape is it?")])
    torch.testing.assert_close(_logits(model, ids), _logits(s2.model.eval(), ids), rtol=0, atol=1e-4)
    # The export's chat template + processor give training's ids, <im_start>/<im_end> included.
    image = Image.new("RGB", (IMAGE, IMAGE), (200, 30, 30))
    for turns in ([("human", "<image>\nWhat shape is it?")], [("human", "<image>")],
                  [("human", "<image>\nWhat?"), ("gpt", "A red  circle."), ("human", "And its colour?")],
                  [("human", "No image here.")]):
        messages = []
        for role, text in turns:
            content = ([{"type": "image"}] if "<image>" in text else []) + (
                [{"type": "text", "text": text.replace("<image>\n", "").replace("<image>", "")}]
                if text.replace("<image>", "").strip() else [])
            messages.append({"role": "user" if role == "human" else "assistant", "content": content})
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        has_image = any("<image>" in t for _, t in turns)
        got = processor(images=[image] if has_image else None, text=prompt, return_tensors="pt")["input_ids"][0]
        assert got.tolist() == _conversation_ids(s2.processor.tokenizer, turns), turns
    info = json.loads((out / "lora_llava.json").read_text())
    assert info["template"] == "llava_v0"


def test_llava_export_is_v1s_original_layout(v1):
    s2 = v1["s2"]
    out = merge(s2.output_dir, v1["root"] / "llava", format="llava", dtype="fp32", progress=False).out
    config = json.loads((out / "config.json").read_text())
    assert config["mm_projector_type"] == "linear" and config["mm_use_im_start_end"] is True
    assert config["mm_use_im_patch_token"] is False and config["mm_vision_select_layer"] == -2
    keys = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    assert {k for k in keys if "mm_projector" in k} == {"model.mm_projector.weight", "model.mm_projector.bias"}
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    added = {v["content"]: int(k) for k, v in tok_config["added_tokens_decoder"].items()}
    assert (added["<image>"], added["<im_start>"], added["<im_end>"], added["<pad>"]) == (32000, 32001, 32002, 32003)
    # Read back by our original-layout loader: the same model.
    recipe = recipe_from_dict({"model": {"llava": str(out), "projector_type": "linear", "image_tokens": "start_end",
                                         "attn_implementation": "sdpa"},
                               "quant": {"bits": 16}, "data": {"train": "x.json"}}, check_files=False)
    model, processor = load_model(recipe)
    ids = _conversation_ids(processor.tokenizer, [("human", "<image>\nWhat shape is it?")])
    torch.testing.assert_close(_logits(model.eval(), ids), _logits(s2.model.eval(), ids), rtol=0, atol=1e-4)


def test_v0_generation_stops_at_the_separator(v1):
    from lora_llava.infer.generate import AnswerStreamer, cut_answer, text_stop

    tok = v1["s2"].processor.tokenizer
    assert text_stop(get_template("llava_v0"), tok) == "###"
    assert cut_answer(" A red circle.\n### Human: and", "###") == "A red circle."
    shown = []
    streamer = AnswerStreamer(tok, "###", shown.append)
    streamer.put(torch.tensor([1]))  # generate() passes the prompt first
    for t in tok(" A red circle.\n### Human:", add_special_tokens=False).input_ids:
        streamer.put(torch.tensor([t]))
    assert streamer.answer == "A red circle." and "".join(shown) == "A red circle."


def test_llava_export_runs_in_the_reference(v1, tmp_path):
    """The v1 export in the original layout, loaded by the LLaVA reference code (llava-torch 1.2.2.post1): a
    ``nn.Linear`` projector, <im_start>/<im_end> at training's ids, and the same logits as the hf export on
    training's ids (the image spliced in by the reference itself)."""
    import os
    import subprocess
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from reference_env import reference_python
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    python = reference_python()
    s2 = v1["s2"]
    llava = merge(s2.output_dir, tmp_path / "llava-v1-tiny", format="llava", dtype="fp32", progress=False).out
    hf = merge(s2.output_dir, tmp_path / "hf", dtype="fp32", progress=False).out
    image = tmp_path / "red.png"
    Image.new("RGB", (IMAGE, IMAGE), (220, 40, 40)).save(image)
    tok = s2.processor.tokenizer
    prompts = [[("human", "<image>\nWhat shape is it?")], [("human", "Name a colour.")]]
    ours = [_conversation_ids(tok, turns) for turns in prompts]
    # The reference's image index -200 in place of the N image tokens (it keeps <im_start>/<im_end> as text tokens).
    cases = []
    for ids, turns in zip(ours, prompts):
        ref_ids = [t for i, t in enumerate(ids) if t != 32000 or (i > 0 and ids[i - 1] == 32001)]
        ref_ids = [-200 if t == 32000 else t for t in ref_ids]
        cases.append({"input_ids": ref_ids, "image": str(image) if "<image>" in turns[0][1] else None})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "out"
    out.mkdir()
    script = Path(__file__).with_name("reference_llava_ids.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    done = subprocess.run([str(python), str(script), str(llava), str(tmp_path / "cases.json"), str(out)], cwd=llava,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "info.json").read_text())
    assert (info["im_start"], info["im_end"], info["projector"], info["mm_use_im_start_end"]) == (
        32001, 32002, "Linear", True)
    model = LlavaForConditionalGeneration.from_pretrained(str(hf), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(hf))
    for k, (ids, case) in enumerate(zip(ours, cases)):
        ref = np.load(out / f"logits{k}.npy")
        kwargs = {}
        if case["image"]:
            kwargs["pixel_values"] = processor.image_processor(Image.open(image).convert("RGB"),
                                                               return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), **kwargs).logits[0, :, : ref.shape[1]].numpy()
        assert logits.shape == ref.shape
        print(f"max |hf export - reference| logit, v1 ({'image' if case['image'] else 'text'}): "
              f"{np.abs(logits - ref).max():.2e}")
        assert np.abs(logits - ref).max() < 1e-4, case


def test_run_and_both_exports_answer_alike(v1, shapes_data):
    """lora-llava's own loading of the run folder, the hf export and the original-layout export (each with no recipe
    keys given: the checkpoint says it is v1): the "###" template, <im_start>/<im_end>, the same greedy answers."""
    from lora_llava.infer.generate import generate_answers
    from lora_llava.infer.load import load_for_inference

    s2 = v1["s2"]
    hf = merge(s2.output_dir, v1["root"] / "hf-gen", dtype="fp32", progress=False).out
    llava = merge(s2.output_dir, v1["root"] / "llava-gen", format="llava", dtype="fp32", progress=False).out
    folder, _, eval_json = shapes_data
    records = json.loads(eval_json.read_text())[:3]
    turns = [[("human", r["conversations"][0]["value"])] for r in records]
    images = [[r["image"]] for r in records]
    answers = []
    for path in (s2.output_dir, hf, llava):
        loaded = load_for_inference(path)
        assert loaded.template == "llava_v0", loaded
        assert loaded.processor.tokenizer.convert_tokens_to_ids(["<im_start>", "<im_end>"]) == [32001, 32002]
        answers.append(generate_answers(loaded.model, loaded.processor, turns, images, str(folder),
                                        template=loaded.template, max_new_tokens=6))
    assert answers[0] == answers[1] == answers[2], answers


def test_gguf_refuses_a_v1_run(v1, tmp_path):
    from lora_llava.errors import MergeError

    with pytest.raises(MergeError, match="--format gguf: this run is a LLaVA v1 model"):
        merge(v1["s2"].output_dir, tmp_path / "gguf", format="gguf", progress=False)
    assert not (tmp_path / "gguf").exists()


def test_v1_stage2_resumes_with_its_rows(v1):
    """A stage-2 checkpoint holds the adapter (its trainable-token rows included) and the projector file (rows too);
    resuming from it ends where the uninterrupted run ends."""
    root = v1["root"]
    extra = {"save_strategy": "steps", "save_steps": 2, "dataloader_num_workers": 0}

    def recipe(out):
        r = _recipe(v1["parts"], v1["data"], out, stage=2, bits=16, projector=str(v1["s1"].output_dir))
        raw = r.to_dict()
        raw["train"].update(extra)
        return recipe_from_dict(raw)

    full = train(recipe(root / "full"))
    resumed = train(recipe(root / "resumed"), resume=str(root / "full" / "checkpoint-2"))
    a = load_file(str(full.output_dir / "projector.safetensors"))
    b = load_file(str(resumed.output_dir / "projector.safetensors"))
    assert a.keys() == b.keys() and "embed_tokens.rows" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
