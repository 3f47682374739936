"""LLaVA-NeXT (AnyRes) / LLaVA-1.5-HD, the model side: the same tiny NeXT model from parts, from a
llava-hf/llava-v1.6-vicuna-7b-hf layout checkpoint and from a liuhaotian/llava-v1.6-vicuna-7b layout one; the
``image_newline`` (fresh and deterministic, trained with the projector, chained from stage 1); merge of a NeXT run
into a llava-next hf export that plain transformers loads and that answers exactly as the trained model; the
original 1.6 layout round trip; inference, generate and serve on non-square images."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from published_layouts import IMAGE, NEXT_PINPOINTS, build, build_next
from safetensors.torch import load_file

from lora_llava.config.recipe import recipe_from_dict
from lora_llava.data import encode_prompt, get_template
from lora_llava.errors import MergeError, ModelError, RecipeError
from lora_llava.export.merge import merge
from lora_llava.infer.generate import image_inputs, image_tokens_of
from lora_llava.llava.anyres import AnyresGrid
from lora_llava.llava.constants import IGNORE_INDEX
from lora_llava.llava.spec import ModelSpec, config_image_token_id
from lora_llava.model.next import fresh_image_newline
from lora_llava.model.projector import projector_state, read_projector
from lora_llava.model.stage import build_model
from lora_llava.run.folder import RunFolder, write_projector

SIZES = [(70, 30), (30, 90), (40, 40)]
"""(width, height) of test images: wide, tall (both cut into grids that un-pad differently) and square."""


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("published_next")
    paths = build(root)
    paths.update(build_next(root, paths))
    return paths


def _recipe(model: dict, stage=2, bits=16, out="unused", **sections):
    raw = {"model": {"attn_implementation": "sdpa", **model}, "quant": {"bits": bits},
           "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}, "data": {"train": "unused.json"},
           "train": {"stage": stage, "output_dir": str(out), "learning_rate": 1e-2, "warmup_steps": 0}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return recipe_from_dict(raw, check_files=False)


def _parts(p, **extra) -> dict:
    return {"llm": str(p["vicuna"]), "vision_tower": str(p["clip_bin"]), **extra}


def _image(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")


def _prompt_inputs(model, processor, image, question="What is it?"):
    """Inputs as lora-llava's inference builds them: training's encode_prompt with the image's own token count."""
    config = model.config
    ids = encode_prompt([("human", f"<image>\n{question}")], processor.tokenizer, get_template("vicuna_v1"),
                        config_image_token_id(config), image_tokens_of(config, [image]))
    return {"input_ids": torch.tensor([ids]), **image_inputs(processor, [image], model)}


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _names(model, which) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, q in model.named_parameters() if which(n, q)}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits.float()


def test_next_from_parts_llava_hf_and_original_16_is_one_model(published):
    p = published
    ways = {
        "parts + NeXT stage-1 projector": _parts(p, projector=str(p["next_projector"]),
                                                 image_grid_pinpoints=NEXT_PINPOINTS),
        "llava-hf llava_next": {"llava": str(p["llava_next_hf"])},
        # mm_vision_tower names the Hub id; model.vision_tower gives its config offline (1.6 brings its own weights).
        "original 1.6": {"llava": str(p["original_next"]), "vision_tower": str(p["clip_bin"])},
    }
    logits = {}
    for name, model_keys in ways.items():
        recipe = _recipe(model_keys)
        spec = ModelSpec.from_recipe(recipe)
        assert spec.is_next and spec.pinpoints == tuple(tuple(x) for x in NEXT_PINPOINTS), name
        model, processor = build_model(recipe)
        base = _base(model)
        assert type(base).__name__ == "LlavaNextForConditionalGeneration", name
        assert type(processor).__name__ == "LlavaNextProcessor", name
        assert base.config.image_grid_pinpoints == NEXT_PINPOINTS
        grid = AnyresGrid.from_config(base.config)
        for w, h in SIZES:
            image = _image(w, h)
            inputs = _prompt_inputs(base, processor, image)
            n_image = int((inputs["input_ids"] == config_image_token_id(base.config)).sum())
            # The count training and inference use is the one transformers' own processor inserts.
            expanded = processor(images=[image], text="<image>", return_tensors="pt")["input_ids"]
            assert n_image == grid.tokens(h, w) == int((expanded == config_image_token_id(base.config)).sum())
            assert inputs["image_sizes"].tolist() == [[h, w]]
            # <image> / <pad> rows are left out: the llava-hf file stores them in float16.
            logits.setdefault(name, []).append(_logits(base.eval(), inputs)[..., :32000])
    first = logits.pop("parts + NeXT stage-1 projector")
    for name, other in logits.items():
        for a, b in zip(first, other, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=name)


def test_hd_from_a_llava15_stage1_projector_gets_a_fresh_deterministic_newline(published):
    p = published
    recipe = _recipe(_parts(p, projector=str(p["mm_projector"]), image_grid_pinpoints="default"), stage=1)
    model, processor = build_model(recipe)
    base = _base(model)
    assert base.config.image_grid_pinpoints == [[IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE], [2 * IMAGE, 2 * IMAGE]]
    assert processor.image_processor.image_grid_pinpoints == base.config.image_grid_pinpoints
    # The LLaVA-1.5 stage-1 projector (mm_projector.bin) is the NeXT model's projector ...
    released = read_projector(p["mm_projector"])
    state = projector_state(model)
    for k, v in released.items():
        assert torch.equal(state[f"multi_modal_projector.{k}"], v.float()), k
    # ... and image_newline is fresh: the reference's distribution, drawn from a fixed seed.
    hidden = base.config.text_config.hidden_size
    assert torch.equal(state["image_newline"], fresh_image_newline(hidden))
    assert 0.5 / hidden ** 0.5 < state["image_newline"].std() < 2 / hidden ** 0.5
    again, _ = build_model(recipe)
    assert torch.equal(projector_state(again)["image_newline"], state["image_newline"])
    # Stage 1 trains the projector and image_newline, nothing else.
    trainable = sorted(_names(model, lambda n, q: q.requires_grad))
    assert trainable == ["model.image_newline", "model.multi_modal_projector.linear_1.bias",
                         "model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_2.bias",
                         "model.multi_modal_projector.linear_2.weight"]


def test_recipe_pinpoints_narrow_a_next_checkpoints_grids(published):
    model, processor = build_model(_recipe({"llava": str(published["llava_next_hf"]), "image_grid_pinpoints": [
        [IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE]]}))
    base = _base(model)
    assert base.config.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints == [
        [IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE]]
    image = _image(40, 40)  # square: only 1x2 / 2x1 grids are left to it
    inputs = _prompt_inputs(base, processor, image)
    assert inputs["pixel_values"].shape[1] == 3  # the base view + 2 tiles
    expanded = processor(images=[image], text="<image>", return_tensors="pt")["input_ids"]
    assert int((inputs["input_ids"] == 32000).sum()) == int((expanded == 32000).sum())
    _logits(base.eval(), inputs)


def test_clear_errors(published, tmp_path):
    p = published
    with pytest.raises(ModelError, match=r"model.image_grid_pinpoints: \[\[32, 48\]\] are not whole grids .* 32 px"):
        ModelSpec.from_recipe(_recipe(_parts(p, image_grid_pinpoints=[[32, 64], [32, 48]])))
    with pytest.raises(RecipeError, match="model.image_grid_pinpoints"):
        _recipe(_parts(p, image_grid_pinpoints=[[32]]))
    with pytest.raises(RecipeError, match="model.image_grid_pinpoints"):
        _recipe(_parts(p, image_grid_pinpoints="big"))
    with pytest.raises(ModelError, match="model.image_grid_pinpoints: .* llava-hf LLaVA-1.5 checkpoint"):
        ModelSpec.from_recipe(_recipe({"llava": str(p["llava_hf"]), "image_grid_pinpoints": "default"}))
    # A NeXT stage-1 projector given to a LLaVA-1.5 model: named, with the key that fixes it.
    with pytest.raises(ModelError, match="LLaVA-NeXT projector .* set model.image_grid_pinpoints"):
        build_model(_recipe(_parts(p, projector=str(p["next_projector"]))))
    # An original AnyRes checkpoint merged another way than 1.6's spatial_unpad.
    flat = tmp_path / "flat"
    flat.mkdir()
    config = json.loads((p["original_next"] / "config.json").read_text())
    (flat / "config.json").write_text(json.dumps({**config, "mm_patch_merge_type": "flat"}))
    with pytest.raises(ModelError, match="model.llava: .* mm_patch_merge_type 'flat'"):
        ModelSpec.from_recipe(_recipe({"llava": str(flat), "vision_tower": str(p["clip_bin"])}))


def _sample(processor, model, image, question, answer):
    """One training sample built by hand: the prompt as training encodes it, the answer and </s> supervised."""
    tok = processor.tokenizer
    prompt = _prompt_inputs(model, processor, image, question)
    ids = prompt["input_ids"][0].tolist()
    target = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return ids + target, [IGNORE_INDEX] * len(ids) + target, prompt


def _train(model, processor, steps=4, lr=5e-2):
    """A few optimizer steps on non-square images of different tile counts, one right-padded batch."""
    base = _base(model)
    samples = [_sample(processor, base, _image(w, h, seed=i), "What colour is it?", "Red.")
               for i, (w, h) in enumerate(SIZES)]
    longest = max(len(ids) for ids, _, _ in samples)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (longest - len(ids)) for ids, _, _ in samples])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (longest - len(lab)) for _, lab, _ in samples])
    mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids, _, _ in samples])
    pixels = image_inputs(processor, [_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)], base)
    assert pixels["pixel_values"].dim() == 5 and pixels["pixel_values"].shape[0] == len(SIZES)  # tiles per image
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels, **pixels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_image_newline_trains_with_the_projector_and_chains_into_stage_2(published, tmp_path):
    p = published
    model, processor = build_model(_recipe(_parts(p, image_grid_pinpoints=NEXT_PINPOINTS), stage=1))
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    losses = _train(model, processor)
    assert losses[-1] < losses[0]
    changed = _names(model, lambda n, q: not torch.equal(q, before[n]))
    # The projector and image_newline trained; the language model and the vision tower did not.
    assert {n for n in changed if "multi_modal_projector" not in n} == {"model.image_newline"}
    assert any("multi_modal_projector" in n for n in changed)
    # The stage-1 artefact holds projector and image_newline; stage 2 with model.projector: RUN1 gets both.
    stage1 = projector_state(model)
    run1 = RunFolder(tmp_path / "run1")
    run1.path.mkdir()
    write_projector(run1.projector_file, stage1)
    assert sorted(load_file(str(run1.projector_file))) == [
        "image_newline", "multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.bias", "multi_modal_projector.linear_2.weight"]
    model2, _ = build_model(_recipe(_parts(p, projector=str(run1.path), image_grid_pinpoints=NEXT_PINPOINTS)))
    stage2 = projector_state(model2)
    assert sorted(stage2) == sorted(stage1)
    for k, v in stage1.items():
        assert torch.equal(stage2[k], v), k
    trainable = _names(model2, lambda n, q: q.requires_grad)
    assert "model.image_newline" in trainable and any("lora_A" in n for n in trainable)
    # A training checkpoint keeps image_newline with the projector, and resuming puts it back.
    from lora_llava.train.checkpoints import load_trainable, save_trainable

    checkpoint = tmp_path / "run2" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    _train(model2, processor, steps=1)
    save_trainable(model2, checkpoint)
    RunFolder.mark_complete(checkpoint, 2)  # as the trainer does once the whole checkpoint is written
    trained = projector_state(model2)["image_newline"].clone()
    assert not torch.equal(trained, stage1["image_newline"])
    model3, _ = build_model(_recipe(_parts(p, image_grid_pinpoints=NEXT_PINPOINTS)))
    load_trainable(model3, checkpoint)
    assert torch.equal(projector_state(model3)["image_newline"], trained)


BASES = {
    "parts": lambda p: _parts(p, projector=str(p["next_projector"]), image_grid_pinpoints=NEXT_PINPOINTS),
    "llava_next_hf": lambda p: {"llava": str(p["llava_next_hf"])},
    "original_next": lambda p: {"llava": str(p["original_next"]), "vision_tower": str(p["clip_bin"])},
}
"""The three ways to a NeXT model that a run can start from: LLaVA-1.5 parts, a llava-hf 1.6, an original 1.6."""


@pytest.fixture(scope="module")
def next_runs(published, tmp_path_factory):
    """``next_runs(base)``: a stage-2 NeXT run (LoRA + projector + image_newline, 16-bit) from one of :data:`BASES`,
    trained by hand on non-square images and written as training writes a run folder (recipe, processor, run info,
    projector, adapter); (folder, trained model, processor), made once per base."""
    from lora_llava.train.sft import start_run

    cache = {}

    def get(base: str):
        if base not in cache:
            out = tmp_path_factory.mktemp(f"next_run_{base}") / "run"
            recipe = _recipe(BASES[base](published), out=out)
            model, processor = build_model(recipe)
            start = projector_state(model)["image_newline"].clone()
            start_run(out, recipe, model, processor)
            _train(model, processor)
            run = RunFolder(out)
            run.write_projector(projector_state(model))
            run.write_folder(run.adapter_dir,
                             lambda tmp: model.save_pretrained(str(tmp), save_embedding_layers=False))
            assert not torch.equal(projector_state(model)["image_newline"], start)  # stage 2 trains image_newline
            cache[base] = out, model, processor
        return cache[base]

    return get


@pytest.fixture(params=list(BASES))
def next_run(request, next_runs):
    return next_runs(request.param)


def test_hf_export_of_a_next_run_loads_in_plain_transformers_and_equals_the_trained_model(next_run, tmp_path):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    out, trained, processor = next_run
    export = tmp_path / "export"
    merge(out, export, dtype="fp32", progress=False)
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert config["image_grid_pinpoints"] == NEXT_PINPOINTS
    model = LlavaNextForConditionalGeneration.from_pretrained(str(export), dtype=torch.float32).eval()
    plain = AutoProcessor.from_pretrained(str(export))
    assert type(plain).__name__ == "LlavaNextProcessor"
    base = _base(trained)
    assert torch.equal(model.model.image_newline, base.model.image_newline.float())
    conversations = {
        "one question": ([("human", "<image>\nWhat is it?")],
                         [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]),
        "two rounds": ([("human", "<image>\nWhat is it?"), ("gpt", "A red circle."), ("human", "Where is it?")],
                       [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
                        {"role": "user", "content": [{"type": "text", "text": "Where is it?"}]}]),
    }
    # Wide, tall, square, a 1x3 shape, one smaller than a tile, one larger than every grid.
    sizes = [*SIZES, (100, 30), (12, 20), (150, 120)]
    for i, (w, h) in enumerate(sizes):
        image = _image(w, h, seed=10 + i)
        for name, (turns, messages) in conversations.items():
            ids = encode_prompt(turns, processor.tokenizer, get_template("vicuna_v1"),
                                config_image_token_id(base.config), image_tokens_of(base.config, [image]))
            ours = {"input_ids": torch.tensor([ids]), **image_inputs(processor, [image], base)}
            text = plain.apply_chat_template(messages, add_generation_prompt=True)
            theirs = plain(images=[image], text=text, return_tensors="pt")
            # Plain transformers prepares exactly training's ids and pixels ...
            assert theirs["input_ids"].tolist() == ours["input_ids"].tolist(), (name, w, h)
            assert torch.equal(theirs["pixel_values"], ours["pixel_values"])
            assert theirs["image_sizes"].tolist() == ours["image_sizes"].tolist() == [[h, w]]
            # ... and the merged model answers as the trained one.
            torch.testing.assert_close(_logits(model, dict(theirs)), _logits(trained, ours), rtol=0, atol=1e-4)


def test_original_16_layout_export_round_trips(next_run, tmp_path):
    out, trained, processor = next_run
    export = tmp_path / "export"
    merge(out, export, format="llava", dtype="fp32", progress=False)
    config = json.loads((export / "config.json").read_text())
    assert (config["image_aspect_ratio"], config["mm_patch_merge_type"]) == ("anyres", "spatial_unpad")
    assert config["image_grid_pinpoints"] == NEXT_PINPOINTS
    from safetensors import safe_open

    keys = set()
    for f in export.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    assert "model.image_newline" in keys and "model.mm_projector.0.weight" in keys
    # A 1.6 base trained its tower: the export carries it under the reference's names; LLaVA-1.5 parts name CLIP's.
    tuned = RunFolder(out).read_recipe().model.llava is not None
    assert config["unfreeze_mm_vision_tower"] is tuned
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in keys) is tuned
    model, processor2 = build_model(_recipe({"llava": str(export)}))
    base = _base(model).eval()
    image = _image(70, 30, seed=3)
    inputs = _prompt_inputs(base, processor2, image)
    assert inputs["input_ids"].tolist() == _prompt_inputs(_base(trained), processor, image)[
        "input_ids"].tolist()
    torch.testing.assert_close(_logits(base, inputs)[..., :32000], _logits(trained, inputs)[..., :32000], rtol=0,
                               atol=1e-4)


def test_gguf_of_a_next_run_is_refused(next_runs, tmp_path):
    with pytest.raises(MergeError, match="--format gguf: .* LLaVA-NeXT"):
        merge(next_runs("parts")[0], tmp_path / "gguf", format="gguf", progress=False)
    assert not (tmp_path / "gguf").exists()


def test_chat_generate_and_serve_on_a_next_run_and_its_export_agree(next_runs, tmp_path):
    from lora_llava.infer.chat import chat
    from lora_llava.infer.generate import generate_answers
    from lora_llava.infer.load import load_for_inference
    from lora_llava.serve.engine import Engine
    from lora_llava.serve.protocol import ChatRequest

    out, _, _ = next_runs("parts")
    export = tmp_path / "export"
    merge(out, export, dtype="fp32", progress=False)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (w, h) in enumerate(SIZES):
        _image(w, h, seed=20 + i).save(folder / f"{i}.png")
    answers = {}
    for name, path in (("run", out), ("export", export)):
        model, processor, template = load_for_inference(path)
        assert type(_base(model)).__name__ == "LlavaNextForConditionalGeneration"
        prompts = [[("human", "<image>\nWhat colour is it?")] for _ in SIZES]
        got = generate_answers(model, processor, prompts, [[f"{i}.png"] for i in range(len(SIZES))], str(folder),
                               template, max_new_tokens=4, batch_size=3)
        one = [chat(model, processor, [("human", "What colour is it?")], image=folder / f"{i}.png",
                    template=template, max_new_tokens=4) for i in range(len(SIZES))]
        assert got == one  # batched (mixed tile counts, left padding) equals one at a time
        from lora_llava.infer.chat import ChatSession

        session = ChatSession(model, processor, template, image=folder / "1.png", max_new_tokens=4)
        assert session.ask("What colour is it?") == one[1]
        engine = Engine(model, processor, template, max_batch=4, batch_wait_s=0.5)
        try:
            done = []
            import threading

            finished = threading.Event()

            def emit(event, bucket=done):
                if event[0] in ("done", "error"):
                    bucket.append(event)
                    if len(bucket) == len(SIZES):
                        finished.set()

            for i in range(len(SIZES)):
                request = ChatRequest(turns=[("human", "What colour is it?")],
                                      image=Image.open(folder / f"{i}.png").convert("RGB"), max_tokens=4,
                                      temperature=0.0, top_p=1.0, stop=[], stream=False)
                engine.submit(engine.prepare(request, emit))
            assert finished.wait(120)
        finally:
            engine.close()
        assert all(e[0] == "done" for e in done), done
        answers[name] = (got, sorted(e[1] for e in done))
    assert answers["run"] == answers["export"]
    assert sorted(answers["run"][0]) == answers["run"][1]


def test_qlora_next_keeps_tower_projector_and_newline_unquantized(published):
    import bitsandbytes as bnb

    model, processor = build_model(_recipe(_parts(published, image_grid_pinpoints="default"), bits=4))
    base = _base(model)
    quantized = {n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized and all(n.startswith("model.language_model.layers.") for n in quantized)
    assert base.model.image_newline.dtype == torch.float32 and base.model.image_newline.requires_grad
    inputs = _prompt_inputs(base, processor, _image(30, 90))
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert base.model.image_newline.grad is not None and base.model.image_newline.grad.abs().sum() > 0
