"""The export in the original layout, loaded and run by the LLaVA reference code itself (llava-torch 1.2.2.post1 on
transformers 4.36.2, in a virtualenv of its own: tests/reference_env.py): its preprocessing gives the ids plain
transformers gets from the hf export, its logits equal the hf export's, and its greedy answers equal lora-llava's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from reference_env import reference_python

from lora_llava.export.merge import merge

SCRIPT = Path(__file__).with_name("reference_llava.py")
STEPS = 8
# Texts where tokenizers disagree: spaces after <image> and at the start of a piece, runs of spaces, a bare <image>,
# an image at the end, several turns, other scripts, digits.
CONVERSATIONS = [
    [["human", "<image>\nWhat is this?"]],
    [["human", "<image> What is  this?"]],
    [["human", "<image>"]],
    [["human", "Describe it.\n<image>"]],
    [["human", "  two  leading spaces <image>   three after"]],
    [["human", "<image>\nWhat shape?"], ["gpt", "A  red   circle."], ["human", "数字 12345 🙂 and\ttabs?"]],
    [["human", "Hi"], ["gpt", "Hello!\n\nHow can I help?"], ["human", "\n leading newline"]],
]


@pytest.fixture(scope="module")
def reference_run(trained_run, shapes_data, tmp_path_factory):
    """The run, its hf and llava exports, the cases, their image folder, and the reference's results and logits."""
    python = reference_python()
    run = trained_run(16)
    tmp = tmp_path_factory.mktemp("reference")
    hf = merge(run.output_dir, tmp / "hf", dtype="fp32", progress=False).out
    llava = merge(run.output_dir, tmp / "llava-tiny", format="llava", dtype="fp32", progress=False).out
    folder, _, eval_json = shapes_data
    records = json.loads(eval_json.read_text())
    images = tmp / "images"
    images.mkdir()
    square = images / "square.png"
    shutil.copyfile(folder / records[0]["image"], square)
    wide = images / "wide.png"  # non-square: the reference pads it to a square of the mean colour, as training
    Image.open(folder / records[1]["image"]).convert("RGB").resize((48, 26)).save(wide)
    question = records[0]["conversations"][0]["value"].replace("<image>", "").strip()
    cases = [{"question": question, "image": str(square)}, {"question": question, "image": str(wide)},
             {"question": "Name a colour.", "image": None}]
    (tmp / "cases.json").write_text(json.dumps(cases))
    (tmp / "conversations.json").write_text(json.dumps(CONVERSATIONS))
    out = tmp / "out"
    out.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    # The reference opens mm_vision_tower ("./vision_tower") relative to the current directory.
    done = subprocess.run([str(python), str(SCRIPT), str(llava), str(tmp / "cases.json"), str(out),
                           str(tmp / "conversations.json")], cwd=llava,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    logits = [np.load(out / f"logits{k}.npy") for k in range(len(cases))]
    return SimpleNamespace(run=run, hf=hf, llava=llava, cases=cases, images=images, results=results, logits=logits,
                           out=out)


def _hf_inputs(processor, case):
    content = ([{"type": "image"}] if case["image"] else []) + [{"type": "text", "text": case["question"]}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [Image.open(case["image"]).convert("RGB")] if case["image"] else None
    return processor(images=images, text=text, return_tensors="pt")


def test_llava_export_ships_what_the_reference_loads(reference_run):
    llava = reference_run.llava
    results = reference_run.results
    assert (llava / "tokenizer.model").is_file()
    config = json.loads((llava / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["legacy"] is False
    assert json.loads((llava / "config.json").read_text())["mm_vision_tower"] == "./vision_tower"
    # The reference's slow tokenizer sees <image> and <pad> at the ids training gave them.
    assert {r["vocab"] for r in results} == {32002}
    assert {r["dtype"] for r in results} == {"torch.float32"}


def test_reference_preprocessing_gives_the_hf_export_ids(reference_run):
    from transformers import AutoConfig, AutoProcessor

    from lora_llava.llava.spec import config_image_tokens

    hf = reference_run.hf
    cases = reference_run.cases
    results = reference_run.results
    processor = AutoProcessor.from_pretrained(str(hf))
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    n = config_image_tokens(AutoConfig.from_pretrained(str(hf)))
    for case, result in zip(cases, results):
        expanded = [t for i in result["input_ids"] for t in ([image_id] * n if i == -200 else [i])]
        assert _hf_inputs(processor, case)["input_ids"][0].tolist() == expanded, case
    assert results[0]["input_ids"][-20:].count(-200) == 1 and 29871 in results[0]["input_ids"]


def test_training_tokenization_equals_the_reference(reference_run):
    """encode_prompt (the ids training and inference use) against the reference's tokenizer_image_token."""
    from lora_llava.data import encode_prompt, get_template

    run = reference_run.run
    tokenizer = run.processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    reference = json.loads((reference_run.out / "prompt_ids.json").read_text())
    for turns, ref in zip(CONVERSATIONS, reference):
        ours = encode_prompt([tuple(t) for t in turns], tokenizer, get_template("vicuna_v1"), image_id, 1)
        assert ours == [image_id if i == -200 else i for i in ref], turns


def test_reference_logits_equal_the_hf_export(reference_run):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    hf = reference_run.hf
    cases = reference_run.cases
    logits = reference_run.logits
    processor = AutoProcessor.from_pretrained(str(hf))
    model = LlavaForConditionalGeneration.from_pretrained(str(hf), dtype=torch.float32).eval()
    for case, ref in zip(cases, logits):
        with torch.no_grad():
            ours = model(**_hf_inputs(processor, case)).logits[0, :, : ref.shape[1]].numpy()
        assert ours.shape == ref.shape
        print(f"max |hf export - reference| logit ({'image' if case['image'] else 'text'}): "
              f"{np.abs(ours - ref).max():.2e} over {ref.shape[0]} positions")
        assert np.abs(ours - ref).max() < 1e-4, case


def test_reference_greedy_answers_equal_lora_llava(reference_run, capsys):
    from lora_llava.cli import main as cli
    from lora_llava.infer.generate import generate_answers

    run = reference_run.run
    cases = reference_run.cases
    images = reference_run.images
    results = reference_run.results
    turns = [[("human", ("<image>\n" if c["image"] else "") + c["question"])] for c in cases]
    files = [[Path(c["image"]).name] if c["image"] else [] for c in cases]
    ours = generate_answers(run.model, run.processor, turns, files, str(images), template="vicuna_v1",
                            max_new_tokens=STEPS)
    assert ours == [r["answer"] for r in results]
    assert any(ours)  # the tiny model answers something
    assert cli.main(["chat", str(run.output_dir), "--image", cases[1]["image"], "--prompt", cases[1]["question"],
                     "--max-new-tokens", str(STEPS)]) == 0
    assert capsys.readouterr().out.strip() == results[1]["answer"]
    print("answers (lora-llava = reference):", ours)
