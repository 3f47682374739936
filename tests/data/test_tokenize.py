"""Templates and labels on the real Llama-2 / Vicuna tokenizer: exact strings, exact masks."""

from __future__ import annotations

import pytest

from lora_llava.data import encode_prompt, encode_sample, get_template
from lora_llava.data.sources import Sample
from lora_llava.data.tokenize import SampleTooLong
from lora_llava.llava.constants import IGNORE_INDEX

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
IMG = 32000


def _sample(*turns, images=()):
    roles = ["human", "gpt"]
    turns = [(roles[i % 2], t) for i, t in enumerate(turns)]
    return Sample(id="s", turns=turns, images=list(images), where="t, record 0")


def test_vicuna_v1_exact_string():
    t = get_template("vicuna_v1")
    text = "".join(s for s, _ in t.render(_sample("Q1", "A1", "Q2", "A2").turns))
    assert text == f"{SYSTEM} USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"
    assert t.prompt([("human", "Q1")]) == f"{SYSTEM} USER: Q1 ASSISTANT:"


def test_plain_exact_string():
    segs = get_template("plain").render(_sample("<image>\nDescribe briefly.", "a dog on grass").turns)
    assert segs == [("<image>", False), ("a dog on grass\n", True)]


def test_llava_v0_string():
    turns = [("human", "Hi"), ("gpt", "Hello"), ("human", "And?"), ("gpt", "Bye")]
    segs = get_template("llava_v0").render(turns)
    text = "".join(s for s, _ in segs)
    system = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the human's questions.")
    # The reference's v0 string: header, "### Role: text\n" per turn, a final "### ".
    assert text == system + "\n\n### Human: Hi\n### Assistant: Hello\n### Human: And?\n### Assistant: Bye\n### "
    assert [s for s, sup in segs if sup] == [" Hello\n###", " Bye\n###"]
    prompt = "".join(s for s, _ in get_template("llava_v0").render(turns[:3], add_generation_prompt=True))
    assert prompt == system + "\n\n### Human: Hi\n### Assistant: Hello\n### Human: And?\n### Assistant:"


def test_hand_checked_ids_and_labels(vicuna_tokenizer):
    tok = vicuna_tokenizer
    enc = encode_sample(_sample("What is it?", "A red circle."), tok, get_template("vicuna_v1"), IMG, 4)
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    assert enc.input_ids[0] == 1  # BOS once
    assert tokens[-17:] == ["▁US", "ER", ":", "▁What", "▁is", "▁it", "?", "▁A", "SS", "IST", "ANT", ":",
                            "▁A", "▁red", "▁circle", ".", "</s>"]
    assert enc.input_ids == tok(f"{SYSTEM} USER: What is it? ASSISTANT: A red circle.</s>").input_ids
    supervised = [t for t, lab in zip(tokens, enc.labels) if lab != IGNORE_INDEX]
    assert supervised == ["▁A", "▁red", "▁circle", ".", "</s>"]
    assert [lab for lab in enc.labels if lab != IGNORE_INDEX] == [319, 2654, 8607, 29889, 2]


def test_multi_turn_supervises_each_answer_and_its_eos(vicuna_tokenizer):
    tok = vicuna_tokenizer
    enc = encode_sample(_sample("Hi", "Hello there", "And?", "Line one\nline two 42"), tok,
                        get_template("vicuna_v1"), IMG, 4)
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    supervised = [t for t, lab in zip(tokens, enc.labels) if lab != IGNORE_INDEX]
    assert supervised == ["▁Hello", "▁there", "</s>", "▁Line", "▁one", "<0x0A>", "line", "▁two", "▁", "4", "2", "</s>"]
    # The second "USER:" follows </s> directly and is not supervised.
    i = tokens.index("</s>")
    assert tokens[i + 1] == "USER" and enc.labels[i + 1] == IGNORE_INDEX


def _reference_style_labels(tok, prompt):
    """The reference's length-based masking (LLaVA preprocess_v1, non-legacy tokenizer), written from its
    description: split into rounds on </s>, mask each round's instruction up to ' ASSISTANT: '."""
    ids = tok(prompt).input_ids
    target = list(ids)
    target[0] = IGNORE_INDEX
    cur = 1
    for i, rou in enumerate(prompt.split("</s>")):
        if not rou:
            break
        before, sep, _ = rou.partition(" ASSISTANT: ")
        round_len = len(tok(rou).input_ids)
        instruction_len = len(tok(before + sep).input_ids) - 2
        if i != 0:
            round_len -= 1
            instruction_len -= 1
        target[cur:cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    return ids, target


@pytest.mark.parametrize("turns", [
    ("Hi", "Hello there"),
    ("What colour is the bus?", "It is yellow.", "How many wheels?", "Six wheels, 2 in front."),
    ("Übersetze: Café", "Kaffee ☕ – ok", "Zahl?", "3.14159"),
    ("List them", "1. apples\n2. pears\n\nDone", "More", "No more."),
])
def test_matches_reference_masking_on_text_samples(vicuna_tokenizer, turns):
    tok = vicuna_tokenizer
    tmpl = get_template("vicuna_v1")
    sample = _sample(*turns)
    prompt = "".join(s for s, _ in tmpl.render(sample.turns))
    ref_ids, ref_labels = _reference_style_labels(tok, prompt)
    enc = encode_sample(sample, tok, tmpl, IMG, 4)
    assert enc.input_ids == ref_ids
    assert enc.labels == ref_labels


def test_image_tokens_spliced_and_masked(vicuna_tokenizer):
    tok = vicuna_tokenizer
    tmpl = get_template("vicuna_v1")
    enc = encode_sample(_sample("<image>\nWhat is it?", "A cat."), tok, tmpl, IMG, 576)
    assert enc.input_ids.count(IMG) == 576
    start = enc.input_ids.index(IMG)
    assert enc.input_ids[start:start + 576] == [IMG] * 576
    assert all(lab == IGNORE_INDEX for lab in enc.labels[: start + 576])
    # Text around the image is tokenized as separate pieces, BOS only at the very start.
    before = tok(f"{SYSTEM} USER: ").input_ids
    after = tok("\nWhat is it? ASSISTANT: A cat.</s>", add_special_tokens=False).input_ids
    assert enc.input_ids == before + [IMG] * 576 + after
    assert enc.input_ids.count(1) == 1


@pytest.mark.parametrize("caption", ["a dog", "3 dogs on grass"])
def test_plain_template_supervises_caption_and_newline(vicuna_tokenizer, caption):
    tok = vicuna_tokenizer
    enc = encode_sample(_sample("Describe.\n<image>", caption), tok, get_template("plain"), IMG, 3)
    assert enc.input_ids == [1, IMG, IMG, IMG] + tok(caption + "\n", add_special_tokens=False).input_ids
    # Reference (preprocess_plain): everything after BOS + image is supervised, the leading "▁" included.
    assert enc.labels[:4] == [IGNORE_INDEX] * 4 and enc.labels[4:] == enc.input_ids[4:]


def test_generation_prompt_is_training_prefix(vicuna_tokenizer):
    tok = vicuna_tokenizer
    tmpl = get_template("vicuna_v1")
    prompt = encode_prompt([("human", "<image>\nWhat?")], tok, tmpl, IMG, 5)
    full = encode_sample(_sample("<image>\nWhat?", "Blue."), tok, tmpl, IMG, 5)
    assert full.input_ids[: len(prompt)] == prompt
    first_supervised = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
    assert first_supervised == len(prompt)


def test_truncation_keeps_images_and_a_supervised_token(vicuna_tokenizer):
    tok = vicuna_tokenizer
    tmpl = get_template("vicuna_v1")
    sample = _sample("<image>\nQ", "word " * 50)
    full = encode_sample(sample, tok, tmpl, IMG, 10)
    cut = encode_sample(sample, tok, tmpl, IMG, 10, max_length=len(full.input_ids) - 20)
    assert cut.truncated and len(cut.input_ids) == len(full.input_ids) - 20
    assert cut.input_ids.count(IMG) == 10 and any(lab != IGNORE_INDEX for lab in cut.labels)
    with pytest.raises(SampleTooLong, match="split image tokens"):
        encode_sample(sample, tok, tmpl, IMG, 10, max_length=20)


def test_no_supervised_token_is_an_error(vicuna_tokenizer):
    from lora_llava.data import Template

    broken = Template("broken", lambda t, turns, gen: [("".join(v for _, v in turns), False)])
    with pytest.raises(ValueError, match="t, record 0: no token of the answers is supervised"):
        encode_sample(_sample("Hi", "Hello"), vicuna_tokenizer, broken, IMG, 2)


def test_custom_template_registration():
    from lora_llava.data import TEMPLATES, Template, register_template

    t = Template("mine", lambda t, turns, gen: [(turns[0][1] + " => ", False), (turns[1][1] + "</s>", True)])
    register_template(t)
    try:
        assert get_template("mine") is t
        with pytest.raises(ValueError, match="exists"):
            register_template(t)
    finally:
        TEMPLATES.pop("mine")
    with pytest.raises(ValueError, match="unknown template 'mine'; known: llava_v0, plain, vicuna_v1"):
        get_template("mine")


def test_per_image_token_counts(vicuna_tokenizer):
    """AnyRes: each image has its own count; the counts go to the images in order, and a wrong number of counts is
    an error rather than a misaligned sample."""
    tmpl = get_template("vicuna_v1")
    turns = [("human", "<image>\nA <image> and B")]
    ids = encode_prompt(turns, vicuna_tokenizer, tmpl, 32000, [3, 5])
    runs = [len(r) for r in "".join("x" if i == 32000 else "." for i in ids).split(".") if r]
    assert runs == [3, 5]
    assert encode_prompt(turns, vicuna_tokenizer, tmpl, 32000, 4) == encode_prompt(turns, vicuna_tokenizer, tmpl,
                                                                                    32000, [4, 4])
    with pytest.raises(ValueError, match="2 <image> tags"):
        encode_prompt(turns, vicuna_tokenizer, tmpl, 32000, [3])


def test_llava_v0_labels_with_image_start_end_hand_checked():
    """LLaVA v1 on the real tokenizer: <im_start> + image tokens + <im_end> masked, each answer and the "###" that
    closes it supervised (the stop the model learns), the "### Human:" / "### Assistant:" headers and the final
    "### " not."""
    from lora_llava.llava.tokenizer import add_llava_tokens, vicuna_tokenizer

    tok = vicuna_tokenizer()
    add_llava_tokens(tok, start_end=True)
    sample = _sample("<image>\nWhat is it?", "A red circle.", "Sure?", "Yes.", images=["a.png"])
    enc = encode_sample(sample, tok, get_template("llava_v0"), IMG, 3)
    at = enc.input_ids.index(32001)
    tail = list(zip(tok.convert_ids_to_tokens(enc.input_ids[at - 6:]), enc.labels[at - 6:]))
    m = IGNORE_INDEX
    assert tail == [
        ("<0x0A>", m), ("##", m), ("#", m), ("▁Human", m), (":", m), ("▁", m),
        ("<im_start>", m), ("<image>", m), ("<image>", m), ("<image>", m), ("<im_end>", m),
        ("▁", m), ("<0x0A>", m), ("What", m), ("▁is", m), ("▁it", m), ("?", m),
        ("<0x0A>", m), ("##", m), ("#", m), ("▁Ass", m), ("istant", m), (":", m),
        ("▁A", 319), ("▁red", 2654), ("▁circle", 8607), (".", 29889), ("<0x0A>", 13), ("##", 2277), ("#", 29937),
        ("▁Human", m), (":", m), ("▁Sure", m), ("?", m),
        ("<0x0A>", m), ("##", m), ("#", m), ("▁Ass", m), ("istant", m), (":", m),
        ("▁Yes", 3869), (".", 29889), ("<0x0A>", 13), ("##", 2277), ("#", 29937),
        ("▁", m)]
    assert enc.input_ids[0] == 1 and all(lab == m for lab in enc.labels[:at])  # BOS + system + "### Human: " masked
    # The generation prompt is the training string up to "### Assistant:", wrapped image and all.
    prompt = encode_prompt([("human", "<image>\nWhat is it?")], tok, get_template("llava_v0"), IMG, 3)
    assert prompt == enc.input_ids[:at + 17]
    # A tokenizer without <im_start>/<im_end> (LLaVA-1.5) does not wrap.
    plain = encode_prompt([("human", "<image>\nWhat is it?")], _plain_tokenizer(), get_template("llava_v0"),
                          IMG, 3)
    assert 32001 not in plain and plain.count(IMG) == 3


def _plain_tokenizer():
    from lora_llava.llava.tokenizer import load_tokenizer

    return load_tokenizer()
