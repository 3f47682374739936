"""An hf export, used through plain transformers (AutoProcessor + chat template, pipeline, generate), gets exactly the
inputs training built: the same input_ids and the same pixel_values, bit for bit."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lora_llava.data import LlavaCollator, LlavaDataset, encode_prompt, get_template
from lora_llava.data.sources import place_image
from lora_llava.export.merge import merge
from lora_llava.infer.generate import generate_answers
from lora_llava.llava.spec import config_image_token_id, config_image_tokens

QUESTION = "What shape is shown, and what colour is it?"


@pytest.fixture(scope="module")
def export(trained_run, tmp_path_factory):
    run = trained_run(16)
    out = merge(run.output_dir, tmp_path_factory.mktemp("fidelity") / "export", dtype="fp32", progress=False).out
    return run, out


@pytest.fixture(scope="module")
def images(shapes_data):
    """{name: path relative to the image folder}: a wide and a tall picture of the data, and a square one."""
    folder, _, _ = shapes_data
    (folder / "images" / "square.png").parent.mkdir(exist_ok=True)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(folder / "images" / "square.png")
    Image.open(folder / "images" / "train_00000.png").transpose(Image.Transpose.ROTATE_90).save(
        folder / "images" / "tall.png")
    return {"wide": "images/train_00000.png", "tall": "images/tall.png", "square": "images/square.png"}


def _messages(turns, with_image):
    out = []
    for i, (role, text) in enumerate(turns):
        if role == "human":
            content = [{"type": "text", "text": text}]
            if with_image and i == 0:
                content.insert(0, {"type": "image"})
            out.append({"role": "user", "content": content})
        else:
            out.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    return out


CONVERSATIONS = {
    "one turn": [("human", QUESTION), ("gpt", "A red circle.")],
    "three turns": [("human", QUESTION), ("gpt", "A red circle."), ("human", "Is it big?"), ("gpt", "Yes, it is."),
                    ("human", "Anything else?"), ("gpt", "No.")],
    "image only": [("human", ""), ("gpt", "A red circle.")],
}


@pytest.mark.parametrize("name, image", [(name, image) for name in CONVERSATIONS
                                         for image in ("wide", "tall", "square", None)
                                         if image or name != "image only"])  # an empty question needs an image
def test_processor_and_chat_template_give_trainings_ids_and_pixels(export, images, shapes_data, name, image):
    from transformers import AutoProcessor

    run, out = export
    folder, _, _ = shapes_data
    turns = CONVERSATIONS[name]
    record = {"id": "x", "conversations": [{"from": r, "value": (f"<image>\n{t}" if i == 0 and image else t)}
                                            for i, (r, t) in enumerate(turns)]}
    if image:
        record["image"] = images[image]
    config = run.model.config
    ds = LlavaDataset.from_records([record], run.processor.tokenizer, "vicuna_v1", cache_dir=False,
                                   image_token_id=config_image_token_id(config),
                                   num_image_tokens=config_image_tokens(config), image_folder=str(folder))
    trained = LlavaCollator(run.processor.image_processor, run.processor.tokenizer.pad_token_id, str(folder))([ds[0]])

    processor = AutoProcessor.from_pretrained(out)  # plain transformers, none of our code
    text = processor.apply_chat_template(_messages(turns, image is not None))
    pictures = [Image.open(folder / images[image])] if image else None
    plain = processor(images=pictures, text=text, return_tensors="pt")
    assert plain["input_ids"].tolist() == trained["input_ids"].tolist()
    if image:
        assert plain["pixel_values"].dtype == trained["pixel_values"].dtype == torch.float32
        assert torch.equal(plain["pixel_values"], trained["pixel_values"])  # bit for bit

    # The generation prompt: what `lora-llava chat` / `generate` feed the model for the first question.
    prompt = processor.apply_chat_template(_messages(turns[:1], image is not None), add_generation_prompt=True)
    ids = processor(images=pictures, text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    first = place_image([("human", f"<image>\n{turns[0][1]}" if image else turns[0][1])], "first")
    assert ids == encode_prompt(first, run.processor.tokenizer, get_template("vicuna_v1"),
                                config_image_token_id(config), config_image_tokens(config))


def test_plain_generate_and_pipeline_answer_as_lora_llava(export, images, shapes_data):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, pipeline

    run, out = export
    folder, _, _ = shapes_data
    ours = generate_answers(run.model, run.processor, [[("human", f"<image>\n{QUESTION}")]] * 3,
                            [[images[k]] for k in ("wide", "tall", "square")], str(folder), max_new_tokens=8)
    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    messages = _messages([("human", QUESTION)], True)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    for answer, key in zip(ours, ("wide", "tall", "square")):
        picture = Image.open(folder / images[key])
        inputs = processor(images=[picture], text=prompt, return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        text = processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert text == answer
        chat = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": QUESTION}]}]
        piped = pipe(text=chat, max_new_tokens=8, do_sample=False, return_full_text=False)
        assert piped[0]["generated_text"].strip() == answer
