"""Inference: a run folder answers as the model that trained it; `generate` and `chat` answer as generate_answers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lora_llava.cli import main as cli
from lora_llava.data import get_template
from lora_llava.errors import InferenceError
from lora_llava.infer.chat import ChatSession, chat
from lora_llava.infer.generate import AnswerStreamer, generate_answers, stopping_criteria
from lora_llava.infer.load import load_for_inference
from lora_llava.infer.questions import read_questions

QUESTION = "What shape is shown, and what colour is it?"
TOKENS = 6


@pytest.fixture(scope="module")
def runs(trained_run):
    """{name: TrainResult}: stage 2 in 16 and 4 bits, stage 1 in 16 bits; tiny and briefly trained."""
    return {"stage2-16bit": trained_run(16), "stage2-4bit": trained_run(4), "stage1-16bit": trained_run(16, stage=1)}


@pytest.fixture(scope="module")
def run16(runs):
    return runs["stage2-16bit"].output_dir


@pytest.fixture(scope="module")
def loaded16(run16):
    return load_for_inference(run16)


@pytest.fixture(scope="module")
def eval_set(shapes_data):
    """(conversations, image lists, image folder) of the held-out split."""
    folder, _, eval_file = shapes_data
    records = json.loads(eval_file.read_text())
    records = records[:5]
    return [[("human", r["conversations"][0]["value"])] for r in records], [[r["image"]] for r in records], folder


@pytest.mark.parametrize("name", ["stage2-16bit", "stage2-4bit", "stage1-16bit"])
def test_run_folder_answers_as_the_trained_model(runs, eval_set, name):
    result = runs[name]
    prompts, images, folder = eval_set
    if name.endswith("4bit"):  # bitsandbytes' 4-bit matmuls are slow on a CPU
        prompts, images = prompts[:3], images[:3]
    model, processor, template = loaded = load_for_inference(result.output_dir)
    assert loaded.kind == "run" and loaded.image_aspect_ratio == "pad"
    assert template == ("plain" if name.startswith("stage1") else "vicuna_v1")
    assert hasattr(model, "peft_config") == name.startswith("stage2")  # LoRA attached for stage 2 only
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    if name.endswith("4bit"):
        assert model.get_base_model().is_quantized
    kwargs = dict(template=template, max_new_tokens=TOKENS, batch_size=4)
    ours = generate_answers(model, processor, prompts, images, str(folder), **kwargs)
    trained = generate_answers(result.model, result.processor, prompts, images, str(folder), **kwargs)
    assert ours == trained
    assert any(ours), ours


def test_generate_cli_writes_llava_answers(run16, loaded16, eval_set, tmp_path):
    prompts, images, folder = eval_set
    questions = [{"question_id": 7, "image": images[0][0], "text": QUESTION, "category": "conv"},
                 {"question_id": "q-2", "image": images[1][0], "text": "<image>\nWhat do you see?"},
                 {"question_id": 3, "text": "Say something without a picture."},
                 {"question_id": 4, "image": images[2][0], "text": "Describe it."}]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("\n".join(json.dumps(q) for q in questions[:2]) + "\n\n"
                     + "\n".join(json.dumps(q) for q in questions[2:]) + "\n")
    out = tmp_path / "answers" / "a.jsonl"
    rc = cli.main(["generate", str(run16), "--questions", str(qfile), "--image-folder", str(folder), "--out", str(out),
                   "--batch-size", "3", "--max-new-tokens", str(TOKENS)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [7, "q-2", 3, 4]
    assert all(set(r) == {"question_id", "prompt", "text", "answer_id", "model_id"} for r in rows)
    assert [r["prompt"] for r in rows] == [q["text"] for q in questions]  # the question as given
    assert {r["model_id"] for r in rows} == {run16.name}
    assert len({r["answer_id"] for r in rows}) == 4 and all(len(r["answer_id"]) == 32 for r in rows)
    assert [p.name for p in out.parent.iterdir()] == ["a.jsonl"]  # no temporary file left
    # Same answers as generate_answers on the same inputs; the image tag prepended as LLaVA's model_vqa does.
    turns = [[("human", f"<image>\n{QUESTION}")], [("human", "<image>\nWhat do you see?")],
             [("human", "Say something without a picture.")], [("human", "<image>\nDescribe it.")]]
    files = [images[0], images[1], [], images[2]]
    expected = generate_answers(loaded16.model, loaded16.processor, turns, files, str(folder), max_new_tokens=TOKENS,
                                batch_size=3)
    assert [r["text"] for r in rows] == expected


def test_chat_prompt_prints_the_generate_answer(run16, loaded16, eval_set, capsys):
    _, images, folder = eval_set
    rc = cli.main(["chat", str(run16), "--image", str(folder / images[0][0]), "--prompt", QUESTION,
                   "--max-new-tokens", str(TOKENS)])
    assert rc == 0
    expected = generate_answers(loaded16.model, loaded16.processor, [[("human", f"<image>\n{QUESTION}")]],
                                [images[0]], str(folder), max_new_tokens=TOKENS)[0]
    assert expected and capsys.readouterr().out == expected + "\n"


def test_streamed_chat_equals_the_answer_and_keeps_the_training_prompt(loaded16, eval_set):
    model, processor, template = loaded16
    _, images, folder = eval_set
    image = folder / images[0][0]
    session = ChatSession(model, processor, template, image=image, max_new_tokens=TOKENS)
    first_pieces, second_pieces = [], []
    first = session.ask(QUESTION, stream=first_pieces.append)
    second = session.ask("Are you sure?", stream=second_pieces.append)
    assert len(first_pieces) > 1 and "".join(first_pieces) == first
    assert "".join(second_pieces) == second
    # The second question is asked with the whole conversation, the image on the first question only.
    conversation = [("human", f"<image>\n{QUESTION}"), ("gpt", first), ("human", "Are you sure?")]
    expected = generate_answers(model, processor, [conversation[:1], conversation], [images[0], images[0]],
                                str(folder), max_new_tokens=TOKENS, batch_size=1)
    assert [first, second] == expected
    # The one-shot helper: same answer, streamed or not, from a path.
    assert chat(model, processor, conversation[:1], image=image, max_new_tokens=TOKENS) == first
    with pytest.raises(InferenceError, match="only the first question carries the image"):
        session.ask("<image>\nAnd this one?")
    text_only = ChatSession(model, processor, template, max_new_tokens=TOKENS)
    with pytest.raises(InferenceError, match="there is no image"):
        text_only.ask("<image>\nWhat is it?")
    pieces = []
    assert text_only.ask("Hello?", stream=pieces.append) == "".join(pieces)
    sampled = ChatSession(model, processor, template, image=image, max_new_tokens=3, temperature=1.0)
    pieces = []
    assert sampled.ask(QUESTION, stream=pieces.append) == "".join(pieces)


@pytest.mark.parametrize("template, text, answer", [
    ("llava_v0", " A red circle.\n### Human: more", "A red circle."),
    ("llava_v0", " A red ##circle## ", "A red ##circle##"),
    ("plain", "a blue square\nnext caption", "a blue square"),
    ("vicuna_v1", "  A  green triangle.  ", "A  green triangle."),
])
def test_streamer_shows_only_what_the_answer_keeps(vicuna_tokenizer, template, text, answer):
    tok = vicuna_tokenizer
    stop = get_template(template).stop
    stop = None if stop == tok.eos_token else stop
    pieces = []
    streamer = AnswerStreamer(tok, stop, pieces.append)
    ids = tok(text, add_special_tokens=False).input_ids
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, not shown
    stopped_at = None
    criteria = stopping_criteria(tok, stop, 3)
    for k, token in enumerate(ids):
        streamer.put(torch.tensor([token]))
        so_far = torch.tensor([[1, 2, 3, *ids[:k + 1]]])
        if stopped_at is None and criteria is not None and bool(criteria(so_far, None)[0]):
            stopped_at = k
        assert answer.startswith("".join(pieces))  # never shows what the answer will not have
    streamer.end()
    assert "".join(pieces) == streamer.answer == answer
    if stop and stop in text:
        assert tok.decode(ids[:stopped_at + 1]).endswith(stop)  # generation stops on the stop string's token


def test_checkpoint_folders(tiny_llava, loaded16, tmp_path):
    model, processor, template = loaded = load_for_inference(tiny_llava)
    assert loaded.kind == "llava-hf" and template == "vicuna_v1"
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.tokenizer.pad_token_id == 32001
    export = tmp_path / "export"
    shutil.copytree(tiny_llava, export)
    (export / "lora_llava.json").write_text(json.dumps({"template": "llava_v0"}))
    assert load_for_inference(export).template == "llava_v0"
    (export / "lora_llava.json").write_text(json.dumps({"template": "chatml"}))
    with pytest.raises(InferenceError, match=r"lora_llava.json': template: unknown template 'chatml'"):
        load_for_inference(export)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InferenceError, match=r"holds a 'llama' checkpoint, not a LLaVA model"):
        load_for_inference(llama)


def test_original_llava_layout(tiny_llava, vicuna_tokenizer, eval_set, tmp_path):
    """An original-LLaVA folder (llava_llama config, mm_projector keys, CLIP tower by path) loads through load_model."""
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(tiny_llava)
    hf_model, hf_processor, _ = load_for_inference(tiny_llava)
    clip = tmp_path / "clip"
    hf.model.vision_tower.save_pretrained(clip)
    hf_processor.image_processor.save_pretrained(clip)
    renames = {"model.language_model.": "model.", "model.multi_modal_projector.linear_1.": "model.mm_projector.0.",
               "model.multi_modal_projector.linear_2.": "model.mm_projector.2.", "lm_head.": "lm_head."}
    weights = {}
    for key, value in hf.state_dict().items():
        for old, new in renames.items():
            if key.startswith(old):
                if key.endswith(("embed_tokens.weight", "lm_head.weight")):
                    value = value[:32000]  # Vicuna's vocabulary; <image> and <pad> are added on load
                weights[new + key[len(old):]] = value.contiguous()
    original = tmp_path / "original"
    original.mkdir()
    save_file(weights, str(original / "model.safetensors"), metadata={"format": "pt"})
    config = hf.config.text_config.to_dict()
    config.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], vocab_size=32000,
                  pad_token_id=None, mm_vision_tower=str(clip), mm_projector_type="mlp2x_gelu",
                  mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_use_im_start_end=False,
                  image_aspect_ratio="pad")
    (original / "config.json").write_text(json.dumps(config))
    vicuna_tokenizer.save_pretrained(original)

    model, processor, template = loaded = load_for_inference(original)
    assert loaded.kind == "llava-original" and template == "vicuna_v1" and loaded.image_aspect_ratio == "pad"
    prompts, images, folder = eval_set
    from lora_llava.data import encode_prompt, load_image

    ids = torch.tensor([encode_prompt(prompts[0], processor.tokenizer, get_template(template), 32000, 16)])
    pixels = processor.image_processor(images=[load_image(folder, images[0][0])], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels).logits[..., :32000]
        theirs = hf_model(input_ids=ids, pixel_values=pixels).logits[..., :32000]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_load_errors_name_the_path(runs, run16, tmp_path, pickled_llava):
    with pytest.raises(InferenceError, match=f"'{tmp_path / 'nowhere'}' does not exist"):
        load_for_inference(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InferenceError, match="is not a folder"):
        load_for_inference(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InferenceError, match=r"'.*empty' has neither recipe.yaml .* nor config.json"):
        load_for_inference(tmp_path / "empty")
    broken = tmp_path / "no-adapter"
    shutil.copytree(run16, broken)
    shutil.rmtree(broken / "adapter")
    with pytest.raises(InferenceError, match=f"run folder '{broken}': a stage-2 run .* no LoRA adapter"):
        load_for_inference(broken)
    (broken / "recipe.yaml").write_text("model: {llava: x/y}\ntrain: {stage: 3}\n")
    with pytest.raises(InferenceError, match=f"(?s)run folder '{broken}': recipe .* train.stage: got 3"):
        load_for_inference(broken)
    with pytest.raises(InferenceError, match="bits: got 5"):
        load_for_inference(run16, bits=5)
    # A damaged adapter file is named as such (it was "does not fit the base model"); a pickle is never unpickled.
    damaged = tmp_path / "damaged"
    shutil.copytree(run16, damaged)
    weights = damaged / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InferenceError, match=f"adapter cannot be read: {weights}: not a readable safetensors file"):
        load_for_inference(damaged)
    with pytest.raises(InferenceError, match=f"'{pickled_llava}' has .bin weights that pickle Python objects .* never "
                                             "unpickles"):
        load_for_inference(pickled_llava)


def test_stage1_run_captions_each_image_alone(runs, eval_set):
    """A stage-1 run needs no adapter; its plain template takes no history and needs an image."""
    model, processor, template = load_for_inference(runs["stage1-16bit"].output_dir)
    assert template == "plain"
    _, images, folder = eval_set
    session = ChatSession(model, processor, template, image=folder / images[0][0], max_new_tokens=TOKENS)
    pieces = []
    first = session.ask("What is it?", stream=pieces.append)
    assert first == "".join(pieces) == session.ask("Say it again.")  # the plain prompt is the image alone
    assert first == generate_answers(model, processor, [[("human", "<image>")]], [images[0]], str(folder),
                                     template="plain", max_new_tokens=TOKENS)[0]
    with pytest.raises(InferenceError, match="plain template .* only captions an image"):
        ChatSession(model, processor, template)


def test_bad_questions_are_named_by_line(eval_set, tmp_path):
    _, images, folder = eval_set
    good = json.dumps({"question_id": 1, "image": images[0][0], "text": QUESTION})
    cases = {
        "{not json": "line 2 is not valid JSON",
        json.dumps({"question_id": 2, "image": "../escape.png", "text": "x"}): "line 2: image path '../escape.png' "
                                                                               "leaves the image folder",
        json.dumps({"question_id": 2, "image": "images/missing.png", "text": "x"}): "line 2: image 'images/missing.png'"
                                                                                    " not found",
        json.dumps({"image": images[0][0], "text": "x"}): "line 2: no question_id",
        json.dumps({"question_id": 2, "text": "<image>\nx"}): "line 2: text: has 1 '<image>' tag but there is no image",
        json.dumps([1, 2]): "line 2: expected a JSON object",
        json.dumps({"question_id": 1, "text": "again"}): "line 2: question_id 1 again \\(first on line 1\\)",
        json.dumps({"question_id": 2, "image": "broken.png", "text": "x"}): "line 2 \\(question_id 2\\): image "
                                                                            "'broken.png' cannot be decoded",
    }
    (folder.parent / "escape.png").write_bytes((folder / images[0][0]).read_bytes())  # exists, but outside
    (folder / "broken.png").write_bytes((folder / images[0][0]).read_bytes()[:60])  # a PNG cut short
    qfile = tmp_path / "q.jsonl"
    for line, message in cases.items():
        qfile.write_text(f"{good}\n{line}\n")
        with pytest.raises(ValueError, match=message):
            read_questions(qfile, folder)
    qfile.write_text(f"{good}\n\n{json.dumps({'question_id': 'x', 'text': 'Hi'})}\n")
    records = read_questions(qfile, folder)
    assert [r["turns"] for r in records] == [[("human", f"<image>\n{QUESTION}")], [("human", "Hi")]]
    assert [r["line"] for r in records] == [1, 3]


def test_cli_bad_inputs_exit_1(run16, eval_set, tmp_path, capsys):
    _, images, folder = eval_set
    qfile = tmp_path / "q.jsonl"
    out = tmp_path / "a.jsonl"
    qfile.write_text(json.dumps({"question_id": 1, "image": images[0][0], "text": QUESTION}) + "\n"
                     + json.dumps({"question_id": 2, "text": "fine"}) + "\n{broken\n")
    common = ["--questions", str(qfile), "--image-folder", str(folder), "--out", str(out)]
    assert cli.main(["generate", str(run16), *common]) == 1
    assert f"{qfile}: line 3 is not valid JSON" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".a.jsonl*"))
    # --out naming a folder is refused before the model loads (it failed after every answer was generated).
    (tmp_path / "answers").mkdir()
    folder_out = ["--questions", str(qfile), "--image-folder", str(folder), "--out", str(tmp_path / "answers")]
    assert cli.main(["generate", str(tmp_path / "not-loaded"), *folder_out]) == 2
    assert f"--out '{tmp_path / 'answers'}' is a folder" in capsys.readouterr().err

    qfile.write_text(json.dumps({"question_id": 1, "image": "../../etc/passwd", "text": "x"}) + "\n")
    assert cli.main(["generate", str(run16), *common]) == 1
    assert "line 1: image path '../../etc/passwd' leaves the image folder" in capsys.readouterr().err

    qfile.write_text(json.dumps({"question_id": 1, "text": "x"}) + "\n")
    assert cli.main(["generate", str(tmp_path / "missing-run"), *common]) == 1
    assert f"'{tmp_path / 'missing-run'}' does not exist" in capsys.readouterr().err
    broken = tmp_path / "no-adapter"
    shutil.copytree(run16, broken)
    shutil.rmtree(broken / "adapter")
    assert cli.main(["chat", str(broken), "--prompt", "hi"]) == 1
    assert f"run folder '{broken}'" in capsys.readouterr().err and not out.exists()

    assert cli.main(["chat", str(run16), "--image", str(tmp_path / "nope.png"), "--prompt", "x"]) == 1
    assert f"image '{tmp_path / 'nope.png'}' does not exist" in capsys.readouterr().err
    (tmp_path / "bad.png").write_text("not an image")
    assert cli.main(["chat", str(run16), "--image", str(tmp_path / "bad.png"), "--prompt", "x"]) == 1
    assert "bad.png' cannot be decoded" in capsys.readouterr().err
    assert cli.main(["chat", str(run16), "--template", "nope", "--prompt", "x"]) == 2
    assert "unknown template 'nope'" in capsys.readouterr().err


def test_interactive_chat_reads_stdin_until_exit(run16, loaded16, eval_set):
    """The one subprocess: questions on stdin, answers streamed to stdout, 'exit' ends with code 0."""
    model, processor, template = loaded16
    _, images, folder = eval_set
    image = folder / images[0][0]
    r = subprocess.run([sys.executable, "-m", "lora_llava", "chat", str(run16), "--image", str(image),
                        "--max-new-tokens", str(TOKENS)], input=f"{QUESTION}\n\nAre you sure?\nexit\nnot asked\n",
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    session = ChatSession(model, processor, template, image=image, max_new_tokens=TOKENS)
    expected = [session.ask(QUESTION), session.ask("Are you sure?")]
    assert r.stdout.splitlines() == expected
    assert "Traceback" not in r.stderr
